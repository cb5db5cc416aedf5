"""OUT/report.md and OUT/score_lift.png of an its run."""
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
    ax.set_title("Feedback-Edit ITS: score lift per prompt (above the line = lift)")
    _save(fig, out / "score_lift.png")
    plt.close(fig)

    s, score = summary, summary["score"]
    lines = ["# Feedback-Edit inference-time scaling", ""]
    lines += [f"> {note}" for note in s["notes"]] + ([""] if s["notes"] else [])
    st = s["settings"]
    lines += [f"{s['prompts']} prompts ({s['rejected_prompts']} rejected, {s['resumed_prompts']} resumed from an earlier run): "
              f"{st['responses']} responses x {st['feedbacks']} feedback, {st['feedback_sets']} kept set(s) of <= "
              f"{st['max_kept']} ({st['feedback_pick']}), {st['edits']} edit(s) per set.", "",
              "| | mean select score |", "|---|---|",
              f"| first response | {score['first_mean']} |", f"| final answer | {score['final_mean']} |",
              f"| lift | {score['lift']} |", "",
              f"Finals that are edits: {s['edit_share']}; prompts without a final: {s['no_final']}; "
              f"failed requests: {s['failed_requests']}; wall time {s['wall_seconds']} s.", "",
              "| model | role | calls | cached | errors | completion tokens | seconds |", "|---|---|---|---|---|---|---|"]
    for role, m in s["models"].items():
        lines.append(f"| {m['model']} | {role} | {m['calls']} | {m['cached']} | {m['errors']} | "
                     f"{m['completion_tokens']} | {m['seconds']} |")
    lines += ["", "![score lift](score_lift.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
