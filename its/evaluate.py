"""`./launch.sh its-eval A B judge=URL`: two its runs (or a run vs its policy's plain first answers)
compared pairwise by an LLM judge, Arena-Hard style, in both orders, with a bootstrap CI.

    ./launch.sh its-eval DIR_A DIR_B judge=http://host:8000/v1 [judge_model=NAME] [out=DIR]
                         [samples=1000] [seed=1234] [concurrency=16] [max_new_tokens=1024]

A side is an its output dir (its finals) or DIR:first (that run's first initial responses: the policy
alone). Prompts present in both, with the same conversation, are compared; others are counted.

The judge prompt (JUDGE_SYSTEM / JUDGE_USER below) follows Arena-Hard-Auto's layout: a system prompt that
asks the judge to answer the prompt itself first, then compare both answers for correctness, helpfulness,
relevance, concision and missing information, and end with one verdict label [[A>>B]], [[A>B]], [[A=B]],
[[B>A]] or [[B>>A]]; the user turn holds the prompt and the two answers between start/end markers. The
wording is ours. Each prompt is judged twice, A first and B first (position bias cancels); a verdict
scores A 1 (A>>B, A>B), 0.5 (A=B) or 0; an order whose reply has no label (or failed) is left out and
counted. Identical answers are a tie without asking the judge. A prompt's score is the mean of its judged
orders; the win rate of A is the mean over prompts, with a percentile bootstrap CI over prompts
(eval.metrics.summarize). Judge replies are cached under OUT/cache (a rerun resumes).
Writes OUT/its_eval.json (default OUT: DIR_A/its-eval/<B's name>) and OUT/judgments.jsonl.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from hs3.io import UserError, atomic_write_json, atomic_write_jsonl, cli_main, read_jsonl

JUDGE_SYSTEM = (
    "You are an impartial judge of two AI assistants' answers to the user prompt shown below. "
    "First write your own answer to the prompt. Then compare both assistants' answers with yours: point out "
    "mistakes and inaccurate information, and judge whether each answer is helpful (it does what the prompt "
    "asks, or asks for clarification when the prompt is ambiguous), relevant, and concise, and what important "
    "information it leaves out. Do not let the order of the answers, their length or the assistants' names "
    "sway you. End with exactly one of these verdict labels:\n"
    "[[A>>B]] Assistant A is significantly better\n[[A>B]] Assistant A is slightly better\n"
    "[[A=B]] Tie, relatively the same\n[[B>A]] Assistant B is slightly better\n"
    "[[B>>A]] Assistant B is significantly better\n"
    "Example output: \"My final verdict is [[A>B]]\"."
)
JUDGE_USER = ("<|User Prompt|>\n{prompt}\n\n<|The Start of Assistant A's Answer|>\n{a}\n<|The End of Assistant A's Answer|>"
              "\n\n<|The Start of Assistant B's Answer|>\n{b}\n<|The End of Assistant B's Answer|>")
VERDICT = re.compile(r"\[\[(A>>B|A>B|A=B|B>A|B>>A)\]\]")
A_SCORE = {"A>>B": 1.0, "A>B": 1.0, "A=B": 0.5, "B>A": 0.0, "B>>A": 0.0}


def parse_verdict(text: str) -> Optional[str]:
    """The last verdict label in a judge reply (the final verdict), or None."""
    found = VERDICT.findall(text or "")
    return found[-1] if found else None


def render_prompt(messages: list[dict]) -> str:
    """One user turn as itself; a longer conversation as ROLE: content blocks."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


def judge_messages(prompt: list[dict], a: str, b: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(prompt=render_prompt(prompt), a=a, b=b)}]


def load_side(spec: str) -> tuple[str, dict[str, dict]]:
    """(name, id -> {prompt, text}) of DIR (finals) or DIR:first (first responses)."""
    first = spec.endswith(":first")
    path = Path(spec[:-len(":first")] if first else spec)
    results = path / "results.jsonl"
    if not results.is_file():
        raise UserError(f"{spec}: no results.jsonl (an its output dir, or DIR:first)")
    side = {}
    for r in read_jsonl(results):
        if first:
            c = r["candidates"][0]
            text = None if "error" in c else c["text"]
        else:
            text = r["final"]["text"] if r.get("final") else None
        side[r["id"]] = {"prompt": r["prompt"], "text": text}
    return f"{path.name}{':first' if first else ''}", side


def game_scores(verdict_ab: Optional[str], verdict_ba: Optional[str]) -> list[float]:
    """A's score in each judged order: in the second order A was shown as B."""
    scores = []
    if verdict_ab:
        scores.append(A_SCORE[verdict_ab])
    if verdict_ba:
        scores.append(1.0 - A_SCORE[verdict_ba])
    return scores


def compare(side_a: dict[str, dict], side_b: dict[str, dict], judge, sampling, cache, samples: int = 1000,
            seed: int = 0) -> tuple[dict, list[dict]]:
    from eval.engines import generate_cached
    from eval.metrics import summarize

    common = [i for i in side_a if i in side_b]
    mismatched = [i for i in common if side_a[i]["prompt"] != side_b[i]["prompt"]]
    usable = [i for i in common if i not in mismatched and side_a[i]["text"] is not None and side_b[i]["text"] is not None]
    ask = [i for i in usable if side_a[i]["text"] != side_b[i]["text"]]
    requests = []
    for i in ask:
        p, a, b = side_a[i]["prompt"], side_a[i]["text"], side_b[i]["text"]
        requests += [judge_messages(p, a, b), judge_messages(p, b, a)]
    replies = generate_cached(judge, requests, sampling, cache) if requests else []
    judged = {}
    for n, i in enumerate(ask):
        ab, ba = replies[2 * n], replies[2 * n + 1]
        judged[i] = (ab, ba)
    rows, per_prompt = [], []
    unparsed = failed = 0
    for i in usable:
        if i in judged:
            ab, ba = judged[i]
            v_ab = parse_verdict(ab.text) if ab.error is None else None
            v_ba = parse_verdict(ba.text) if ba.error is None else None
            failed += (ab.error is not None) + (ba.error is not None)
            unparsed += (ab.error is None and v_ab is None) + (ba.error is None and v_ba is None)
            scores = game_scores(v_ab, v_ba)
            row = {"id": i, "verdict_a_first": v_ab, "verdict_b_first": v_ba,
                   "reply_a_first": ab.text if ab.error is None else None, "reply_b_first": ba.text if ba.error is None else None,
                   "errors": [g.error for g in (ab, ba) if g.error]}
        else:
            scores = [0.5]
            row = {"id": i, "identical": True}
        row["score_a"] = sum(scores) / len(scores) if scores else None
        rows.append(row)
        per_prompt.append(row["score_a"])
    win = summarize(per_prompt, samples=samples, seed=seed)
    report = {
        "win_rate_a": win, "prompts_compared": len(usable), "prompts_judged": sum(s is not None for s in per_prompt),
        "identical": len(usable) - len(ask), "judge_requests": len(requests), "judge_failed": failed,
        "judge_unparsed": unparsed, "only_in_a": len([i for i in side_a if i not in side_b]),
        "only_in_b": len([i for i in side_b if i not in side_a]), "prompt_mismatch": len(mismatched),
        "missing_text": len(common) - len(mismatched) - len(usable),
    }
    return report, rows


@cli_main
def main(argv: list[str]) -> int:
    from eval.engines import GenerationCache, HTTPEngine, Sampling

    positional = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    known = {"judge", "judge_model", "out", "samples", "seed", "concurrency", "max_new_tokens", "max_retries"}
    if len(positional) != 2 or set(options) - known or "judge" not in options:
        bad = sorted(set(options) - known)
        raise UserError("usage: its-eval DIR_A DIR_B judge=URL [judge_model= out= samples= seed= concurrency= "
                        "max_new_tokens= max_retries=]" + (f" (unknown: {', '.join(bad)})" if bad else ""))
    try:
        samples, seed = int(options.get("samples", 1000)), int(options.get("seed", 1234))
        concurrency, tokens = int(options.get("concurrency", 16)), int(options.get("max_new_tokens", 1024))
        retries = int(options.get("max_retries", 2))
    except ValueError as exc:
        raise UserError(f"its-eval: {exc}") from None
    name_a, side_a = load_side(positional[0])
    name_b, side_b = load_side(positional[1])
    out = Path(options.get("out") or Path(positional[0].removesuffix(":first")) / "its-eval" /
               f"{name_a.replace(':', '-')}-vs-{name_b.replace(':', '-')}")
    judge = HTTPEngine(options["judge"], options.get("judge_model"), concurrency, retries)
    sampling = Sampling(max_new_tokens=tokens, temperature=0.0, seed=seed)
    report, rows = compare(side_a, side_b, judge, sampling, GenerationCache(out / "cache" / "judge.jsonl"), samples, seed)
    report = {"a": positional[0], "b": positional[1], "judge": judge.model_id, **report}
    atomic_write_jsonl(out / "judgments.jsonl", rows)
    atomic_write_json(out / "its_eval.json", report)
    win = report["win_rate_a"]
    figure = f"{win['value']:.3f} [{win['ci'][0]:.3f}, {win['ci'][1]:.3f}] over {win['n']} prompts" if win else "none"
    print(f"its-eval: win rate of {name_a} vs {name_b}: {figure}; {report['judge_unparsed']} unparsed and "
          f"{report['judge_failed']} failed judge replies, {report['identical']} identical -> {out}/its_eval.json")
    return 0
