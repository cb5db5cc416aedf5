"""OUT/report.md and OUT/select_scores.png of an its run."""
from __future__ import annotations

from pathlib import Path

from hs3.io import atomic_write_text


def write_report(summary: dict, records: list[dict], out: Path) -> None:
    from eval.report import _pyplot, _save

    pairs = [(r["candidates"][0]["score"], r["final"]["score"]) for r in records
             if r["final"] and r["candidates"][0].get("score") is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    if pairs:
        xs, ys = zip(*pairs)
        ax.scatter(xs, ys, s=14, alpha=0.7)
        lo, hi = min(xs + ys), max(xs + ys)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, linestyle="--")
    ax.set_xlabel("select score of the first response")
    ax.set_ylabel("select score of the final answer")
    ax.set_title("Select scores per prompt (a proxy: the final is\nthe Select model's own pick)", fontsize=10)
    _save(fig, out / "select_scores.png")
    plt.close(fig)

    s, score, cut = summary, summary["select_score"], summary["cut"]
    lines = ["# Feedback-Edit inference-time scaling", ""]
    lines += [f"> {note}" for note in s["notes"]] + ([""] if s["notes"] else [])
    st = s["settings"]
    lines += [f"{s['prompts']} prompts ({s['rejected_prompts']} rejected, {s['resumed_prompts']} resumed from an earlier run): "
              f"{st['responses']} responses x {st['feedbacks']} feedback, {st['feedback_sets']} kept set(s) of <= "
              f"{st['max_kept']} ({st['feedback_pick']}), {st['edits']} edit(s) per set; at most {st['max_new_tokens']} "
              f"new tokens per response or edit.", "",
              "| | mean select score |", "|---|---|",
              f"| first response | {score['first_mean']} |", f"| final answer | {score['final_mean']} |",
              f"| select_score_gain (proxy, >= 0 by construction) | {score['gain']} |", "",
              f"Finals that are edits: {s['edit_share']}; finals cut at max_new_tokens: {s['finals_cut']}; prompts "
              f"without a final: {s['no_final']}; failed requests: {s['failed_requests']}; wall time {s['wall_seconds']} s.",
              f"Cut at max_new_tokens (never preferred to a finished candidate): {cut['responses']} of "
              f"{cut['of_responses']} responses, {cut['edits']} of {cut['of_edits']} edits.", "",
              "| model | role | calls | cached | errors | completion tokens | busy seconds |", "|---|---|---|---|---|---|---|"]
    for role, m in s["models"].items():
        lines.append(f"| {m['model']} | {role} | {m['calls']} | {m['cached']} | {m['errors']} | "
                     f"{m['completion_tokens']} | {m['seconds']} |")
    lines += ["", "![select scores](select_scores.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
