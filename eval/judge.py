"""The LLM judge (a gold metric: the policy was never optimised against it): through any
OpenAI-compatible endpoint (eval.judge_endpoint, eval.judge_model), the fixed pairwise prompt of
eval.metrics.JUDGE_TEMPLATE asks which of two edits better applies the feedback to the original
response. The generated edit is compared with the original response left unedited (does the edit apply
the feedback at all?) and with the human edit, each in both orders; ties count half.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from eval.engines import GenerationCache, HTTPEngine, Sampling, generate_cached
from eval.metrics import JUDGE_TEMPLATE, judge_win, parse_judge_verdict

OPPONENTS = (("vs_original", "original_response"), ("vs_reference", "reference_edit"))


def judge_prompt(prompt: list[dict], edit_a: str, edit_b: str) -> list[dict]:
    """prompt = context + original response + edit request (data_prep's layout)."""
    conversation = "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt[:-2])
    text = JUDGE_TEMPLATE.format(conversation=conversation, original=prompt[-2]["content"],
                                 feedback=prompt[-1]["content"], edit_a=edit_a, edit_b=edit_b)
    return [{"role": "user", "content": text}]


def judge_edits(rows: list[dict], records: list[dict], eval_cfg, seed: int,
                cache_path: Path, info: Optional[dict] = None) -> tuple[list[dict[str, Optional[float]]], int]:
    """Per row: {"gold_judge_win_vs_original", "gold_judge_win_vs_reference"}, and how many judge
    requests failed (after retries; those orders count as unparsed). Rows whose generation failed, and
    edits cut at max_new_tokens (finish_reason length: no finished edit), are not judged. `info` is
    given the judge's served model name (report.json's provenance)."""
    judge = HTTPEngine(eval_cfg.judge_endpoint, eval_cfg.judge_model, eval_cfg.concurrency, eval_cfg.max_retries,
                       eval_cfg.request_timeout_s, eval_cfg.api_key_env)
    if info is not None:
        info["served_model"] = judge.model
    scored = [i for i, r in enumerate(records) if r.get("error") is None and r.get("finish_reason") != "length"]
    requests = []
    for i in scored:
        for _, field in OPPONENTS:
            other = rows[i][field]
            requests.append(judge_prompt(rows[i]["prompt"], records[i]["generated"], other))  # edit is A
            requests.append(judge_prompt(rows[i]["prompt"], other, records[i]["generated"]))  # edit is B
    replies = generate_cached(judge, requests, Sampling(max_new_tokens=8, temperature=0.0, seed=seed),
                              GenerationCache(cache_path))
    verdicts = [parse_judge_verdict(r.text) if r.error is None else None for r in replies]
    out: list[dict[str, Optional[float]]] = [{} for _ in records]
    for n, i in enumerate(scored):
        for k, (name, _) in enumerate(OPPONENTS):
            first, second = verdicts[4 * n + 2 * k], verdicts[4 * n + 2 * k + 1]
            out[i][f"gold_judge_win_{name}"] = judge_win(first, second)
    return out, sum(r.error is not None for r in replies)
