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
Writes OUT/its_eval.json (default OUT: DIR_A/its-eval/<B's name>) and OUT/judgments.jsonl; the report
names both sides' models and settings (from their summary.json) and the judge.

Every file it reads is untrusted: a side must be a finished its run (summary.json of an its run, and a
results.jsonl whose every line is a prompt record); anything else (empty, cut, not UTF-8, rows of the
wrong shape, duplicate ids) is a one-line error naming the file and line, never a traceback.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from hs3.io import UserError, atomic_write_json, atomic_write_jsonl, cli_main

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


def _turns_ok(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in value)


def _row_problem(row, first: bool) -> Optional[str]:
    """What is wrong with one results.jsonl line for this side, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("id"), str) or not row["id"]:
        return "no string `id`"
    if not _turns_ok(row.get("prompt")):
        return "`prompt` is not a list of {role, content} turns"
    if first:
        candidates = row.get("candidates")
        if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
            return "no `candidates` list with a first response"
        c = candidates[0]
        if "error" not in c and not isinstance(c.get("text"), str):
            return "the first response has no text and no error"
    else:
        final = row.get("final", "absent")
        if final is not None and not (isinstance(final, dict) and isinstance(final.get("text"), str)):
            return "`final` is neither null nor an object with a text"
    return None


def read_summary(path: Path) -> dict:
    """summary.json of a finished its run: its models and settings (what the side was produced by)."""
    file = path / "summary.json"
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no summary.json (not a finished its run; rerun its to finish it)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{file}: unreadable ({type(exc).__name__}); not an its run's summary") from None
    if not isinstance(summary, dict) or summary.get("stage") != "its" or not isinstance(summary.get("models"), dict) \
            or not isinstance(summary.get("settings"), dict):
        raise UserError(f"{file}: not an its run's summary (an object with stage: its, models and settings)")
    models = {role: m.get("model") if isinstance(m, dict) else m for role, m in summary["models"].items()}
    return {"models": models, "settings": summary["settings"]}


def load_side(spec: str) -> tuple[str, dict[str, dict], dict]:
    """(name, id -> {prompt, text}, provenance) of DIR (finals) or DIR:first (first responses)."""
    first = spec.endswith(":first")
    path = Path(spec[:-len(":first")] if first else spec)
    results = path / "results.jsonl"
    if not results.is_file():
        raise UserError(f"{spec}: no results.jsonl (an its output dir, or DIR:first)")
    provenance = {**read_summary(path), "side": "first responses" if first else "finals"}
    try:
        text = results.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{results}: not UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{results}: cannot read it ({exc.strerror or exc})") from None
    side: dict[str, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{results} line {n}: not valid JSON (a damaged or cut file; rerun its)") from None
        problem = _row_problem(row, first)
        if problem:
            raise UserError(f"{results} line {n}: {problem} (not an its results record)")
        if row["id"] in side:
            raise UserError(f"{results} line {n}: id {row['id']!r} appears twice")
        if first:
            c = row["candidates"][0]
            value = None if "error" in c else c["text"]
        else:
            value = row["final"]["text"] if row.get("final") else None
        side[row["id"]] = {"prompt": row["prompt"], "text": value}
    if not side:
        raise UserError(f"{results}: no rows (an empty its run)")
    return f"{path.name}{':first' if first else ''}", side, provenance


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
    numbers = {}
    for key, default, low in (("samples", 1000, 1), ("seed", 1234, 0), ("concurrency", 16, 1),
                              ("max_new_tokens", 1024, 1), ("max_retries", 2, 0)):
        try:
            numbers[key] = int(options.get(key, default))
        except ValueError:
            raise UserError(f"its-eval: {key}={options[key]} is not an integer") from None
        if numbers[key] < low:
            raise UserError(f"its-eval: {key}={numbers[key]} must be >= {low}")
    if not options["judge"].startswith(("http://", "https://")):
        raise UserError(f"its-eval: judge={options['judge']} is not an http(s) endpoint (an OpenAI-compatible /v1 URL)")
    name_a, side_a, made_a = load_side(positional[0])
    name_b, side_b, made_b = load_side(positional[1])
    out = Path(options.get("out") or Path(positional[0].removesuffix(":first")) / "its-eval" /
               f"{name_a.replace(':', '-')}-vs-{name_b.replace(':', '-')}")
    if out.exists() and not out.is_dir():
        raise UserError(f"its-eval: out={out} exists and is not a directory")
    judge = HTTPEngine(options["judge"], options.get("judge_model"), numbers["concurrency"], numbers["max_retries"])
    sampling = Sampling(max_new_tokens=numbers["max_new_tokens"], temperature=0.0, seed=numbers["seed"])
    try:
        cache = GenerationCache(out / "cache" / "judge.jsonl")
        report, rows = compare(side_a, side_b, judge, sampling, cache, numbers["samples"], numbers["seed"])
        report = {"a": positional[0], "b": positional[1], "judge": judge.model_id,
                  "made_by": {"a": made_a, "b": made_b}, **report}
        atomic_write_jsonl(out / "judgments.jsonl", rows)
        atomic_write_json(out / "its_eval.json", report)
    except OSError as exc:
        raise UserError(f"its-eval: cannot write {out}: {exc.strerror or exc}") from None
    win = report["win_rate_a"]
    figure = f"{win['value']:.3f} [{win['ci'][0]:.3f}, {win['ci'][1]:.3f}] over {win['n']} prompts" if win else "none"
    print(f"its-eval: win rate of {name_a} vs {name_b}: {figure}; {report['judge_unparsed']} unparsed and "
          f"{report['judge_failed']} failed judge replies, {report['identical']} identical -> {out}/its_eval.json")
    return 0
