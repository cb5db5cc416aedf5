"""Optional LLM judge: the generated edit against the human edit, through any OpenAI-compatible
endpoint (eval.judge_endpoint, eval.judge_model), asked twice with the two edits swapped."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from eval.engines import GenerationCache, HTTPEngine, Sampling, generate_cached
from eval.metrics import JUDGE_TEMPLATE, judge_win, parse_judge_verdict


def judge_prompt(prompt: list[dict], edit_a: str, edit_b: str) -> list[dict]:
    """prompt = context + original response + edit request (data_prep's layout)."""
    conversation = "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt[:-2])
    text = JUDGE_TEMPLATE.format(conversation=conversation, original=prompt[-2]["content"],
                                 feedback=prompt[-1]["content"], edit_a=edit_a, edit_b=edit_b)
    return [{"role": "user", "content": text}]


def judge_against_reference(rows: list[dict], records: list[dict], eval_cfg, seed: int,
                            cache_path: Path) -> list[Optional[float]]:
    judge = HTTPEngine(eval_cfg.judge_endpoint, eval_cfg.judge_model, eval_cfg.concurrency, eval_cfg.max_retries,
                       eval_cfg.request_timeout_s, eval_cfg.api_key_env)
    requests = []
    for row, record in zip(rows, records):
        requests.append(judge_prompt(row["prompt"], record["generated"], row["reference_edit"]))  # edit is A
        requests.append(judge_prompt(row["prompt"], row["reference_edit"], record["generated"]))  # edit is B
    replies = generate_cached(judge, requests, Sampling(max_new_tokens=8, temperature=0.0, seed=seed),
                              GenerationCache(cache_path))
    verdicts = [parse_judge_verdict(r.text) for r in replies]
    return [judge_win(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(rows))]
