"""report.md tables and PNG plots from a report dict (shared by the eval run and eval-compare)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from eval.metrics import GENERATION_METRICS, LIKELIHOOD_METRICS, PROXY_GOLD
from hs3.io import atomic_path

# Shown as percentages; chrF is already 0-100; ROUGE-L and length ratio as plain numbers.
NUMBERS = {"chrf", "chrf_sentence_mean", "rouge_l", "length_ratio"}
PERCENT = {k for k, _, _ in GENERATION_METRICS + LIKELIHOOD_METRICS} - NUMBERS
LABELS = {key: label for key, label, _ in GENERATION_METRICS + LIKELIHOOD_METRICS}
# The columns of the per-domain / per-language tables (the full set is in report.json).
GROUP_COLUMNS = ("copy_rate", "gold_reward_win_rate", "gold_judge_win_rate", "chrf", "rouge_l", "proxy_reward_win_rate",
                 "near_copy_rate", "length_ratio", "gold_rm_accuracy", "rm_accuracy", "policy_pref_accuracy")


def fmt(key: str, value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    if key in PERCENT:
        return f"{100 * value:.1f}%"
    return f"{value:.1f}" if key.startswith("chrf") else f"{value:.3f}"


def fmt_ci(key: str, summary: Optional[dict]) -> str:
    """'value [low, high]'."""
    if not summary:
        return "n/a"
    low, high = summary["ci"]
    return f"{fmt(key, summary['value'])} [{fmt(key, low)}, {fmt(key, high)}]"


def describe_sampling(sampling: dict) -> str:
    mode = "greedy" if sampling["temperature"] <= 0 else f"sampled (temperature {sampling['temperature']}, top_p {sampling['top_p']}, seed {sampling['seed']})"
    return f"{mode}, at most {sampling['max_new_tokens']} new tokens"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def overall_table(overall: dict) -> str:
    rows = []
    for key, label, _ in GENERATION_METRICS + LIKELIHOOD_METRICS:
        if key in overall:
            s = overall[key]
            rows.append([label, fmt(key, s["value"]), f"[{fmt(key, s['ci'][0])}, {fmt(key, s['ci'][1])}]", str(s["n"])])
    return md_table(["metric", "value", "95% CI", "n"], rows)


def group_table(groups: dict, name: str) -> str:
    columns = [c for c in GROUP_COLUMNS if any(c in g for g in groups.values())]
    rows = []
    for group, metrics in groups.items():
        counts = [str(metrics[k]["n"]) if k in metrics else "0" for k in ("copy_rate", "rm_accuracy")]
        rows.append([group, *counts] + [fmt_ci(c, metrics.get(c)) for c in columns])
    return md_table([name, "rows", "pairs"] + [LABELS[c] for c in columns], rows)


def describe_gold(gold: dict) -> str:
    parts = []
    if gold.get("reward_model"):
        parts.append(f"reward model `{gold['reward_model']}` ({gold.get('reward_model_kind') or 'kind from its config'}, "
                     f"input: {gold.get('reward_model_input')})")
    if gold.get("judge_endpoint"):
        parts.append(f"LLM judge `{gold.get('judge_model') or 'first model'}` at `{gold['judge_endpoint']}` "
                     f"(pairwise, both orders, ties half)")
    return "; ".join(parts) or "none (set eval.gold_rm and/or eval.judge_endpoint)"


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    counts = report["counts"]
    lines = [
        f"# Eval: {meta['model']}",
        "",
        f"- data: `{meta['data_dir']}` split `{meta['split']}` ({counts['rows']} edit rows, {counts['pairs']} edit_quality pairs)",
        f"- gold scorers (independent of training): {describe_gold(meta.get('gold') or {})}",
        f"- training RM (optimised against; its figures are the proxy): "
        f"`{meta['reward_model'] or 'none (proxy metrics skipped)'}`",
        f"- generation: {describe_sampling(meta['sampling'])}",
        f"- outputs: {counts['empty']} empty, {counts['truncated']} truncated, {counts['copies']} exact copies, "
        f"{counts.get('errors', 0)} failed requests (left out of the metrics)",
        describe_cut(report),
        f"- long prompts: {counts.get('flagged_too_long', 0)} flagged too long for training by the data step, "
        f"{counts.get('prompts_shortened', 0)} shortened before generation (eval/prompts.py)",
        f"- 95% confidence intervals: percentile bootstrap, {meta['bootstrap_samples']} resamples",
        "",
        "## Overall",
        "",
        overall_table(report["overall"]),
        "",
        "## Per domain",
        "",
        group_table(report["by_domain"], "domain"),
        "",
        "## Per language",
        "",
        group_table(report["by_language"], "language"),
        "",
    ]
    for note in meta.get("notes", []):
        lines.append(f"> {note}")
    if meta.get("provenance"):
        lines += ["", "## Provenance", "", *describe_provenance(meta["provenance"])]
    return "\n".join(lines).rstrip() + "\n"


def describe_cut(report: dict) -> str:
    """The win rates' base: finished edits only, with the share cut at max_new_tokens beside it."""
    reasons = report["counts"].get("finish_reasons") or {}
    finished, cut = reasons.get("stop", 0), reasons.get("length", 0)
    share = report.get("cut_share")
    share_text = f"{100 * share:.1f}%" if share is not None else "n/a"
    return (f"- win rates (gold and training RM, judge) over the {finished} finished edits; {cut} cut at "
            f"max_new_tokens (cut share {share_text}) are left out of them")


def _who(entry: dict | None) -> str:
    if not entry:
        return "none"
    if entry.get("endpoint"):
        return f"`{entry.get('path')}` serving `{entry.get('served_model')}`"
    fingerprint = entry.get("fingerprint")
    settings = f", {entry['dtype']}" if entry.get("dtype") else ""
    length = entry.get("max_length") or entry.get("seq_len")
    settings += f", length {length}" if length else ""
    return f"`{entry.get('path')}` (fingerprint {fingerprint[:12] if fingerprint else 'none'}{settings})"


def describe_provenance(provenance: dict) -> list[str]:
    """report.md's provenance lines: the model under test, the scorers, the data."""
    scorers = provenance.get("scorers") or {}
    data = provenance.get("data") or {}
    lines = [f"- model under test: {_who(provenance.get('model'))}"]
    lines += [f"- {label}: {_who(scorers.get(key))}" for key, label in
              (("proxy_rm", "training RM (proxy)"), ("gold_rm", "gold reward model"), ("judge", "LLM judge"))
              if key in scorers]
    manifest = data.get("manifest_sha256")
    lines.append(f"- data: `{data.get('dir')}` split `{data.get('split')}`, manifest sha256 "
                 f"{manifest[:12] if manifest else 'none'}, {data.get('rows')} rows")
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Written atomically, without matplotlib's version stamp in the metadata."""
    with atomic_path(path, suffix=".png") as tmp:  # matplotlib picks the format from the suffix
        fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})


def plot_metrics(reports: dict[str, dict], path: Path, title: str) -> None:
    """Grouped bars: each rate metric (as %) for each checkpoint, with 95% CI error bars."""
    plt = _pyplot()
    keys = [k for k, _, _ in GENERATION_METRICS + LIKELIHOOD_METRICS
            if k in PERCENT and any(k in r["overall"] for r in reports.values())]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys) * max(1, len(reports)) ** 0.5 + 2), 4))
    width = 0.8 / max(len(reports), 1)
    for j, (name, report) in enumerate(reports.items()):
        xs, ys, errs = [], [], [[], []]
        for i, key in enumerate(keys):
            s = report["overall"].get(key)
            if s:
                xs.append(i + (j - (len(reports) - 1) / 2) * width)
                ys.append(100 * s["value"])
                errs[0].append(100 * (s["value"] - s["ci"][0]))
                errs[1].append(100 * (s["ci"][1] - s["value"]))
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=name)
    ax.set_xticks(range(len(keys)), [LABELS[k] for k in keys], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    if len(reports) > 1:
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_copy_rate(report: dict, path: Path) -> None:
    """Exact and near-copy rates, overall and per domain."""
    plt = _pyplot()
    groups = {"overall": report["overall"], **report["by_domain"]}
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(groups) + 2), 3.5))
    for offset, key in ((-0.2, "copy_rate"), (0.2, "near_copy_rate")):
        values = [100 * g[key]["value"] if key in g else 0.0 for g in groups.values()]
        ax.bar([i + offset for i in range(len(groups))], values, 0.4, label=LABELS[key])
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel("% of edits")
    ax.set_ylim(0, 100)
    ax.set_title("copies of the original response")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_length_ratio(ratios: list[float], path: Path) -> None:
    """Histogram of edit length / original length (1 = same length)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(ratios, bins=min(40, max(5, len(ratios) // 2)), color="tab:blue")
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("characters of edit / characters of original")
    ax.set_ylabel("rows")
    ax.set_title("length ratio")
    _save(fig, path)
    plt.close(fig)


def plot_proxy_vs_gold(reports: dict[str, dict], path: Path) -> bool:
    """One panel per gold win rate (RM, judge): x = the training RM's win rate vs the original (what the
    policy was optimised against), y = the gold win rate, one point per checkpoint with 95% CI bars,
    joined in the order given. Points far right of the diagonal: the proxy rose without the gold.
    False (nothing written) when no report has both figures."""
    panels = [(p, g) for p, g in PROXY_GOLD if any(p in r["overall"] and g in r["overall"] for r in reports.values())]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (proxy, gold) in zip(axes[0], panels):
        xs, ys = [], []
        for name, report in reports.items():
            p, g = report["overall"].get(proxy), report["overall"].get(gold)
            if not (p and g):
                continue
            x, y = 100 * p["value"], 100 * g["value"]
            ax.errorbar(x, y, xerr=[[x - 100 * p["ci"][0]], [100 * p["ci"][1] - x]],
                        yerr=[[y - 100 * g["ci"][0]], [100 * g["ci"][1] - y]], fmt="o", capsize=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            xs.append(x)
            ys.append(y)
        ax.plot(xs, ys, color="gray", linewidth=1, alpha=0.6)
        ax.plot([0, 100], [0, 100], color="black", linestyle="--", linewidth=1)
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 108)
        ax.set_xlabel(f"{LABELS[proxy]} (%)", fontsize=8)
        ax.set_ylabel(f"{LABELS[gold]} (%)", fontsize=8)
        ax.set_title("proxy vs gold per checkpoint", fontsize=9)
    _save(fig, path)
    plt.close(fig)
    return True
