"""Side-by-side table of several eval dirs (checkpoints: base, sft, rl, dpo, ...), and a paired test of two.

    ./launch.sh eval-compare DIR1 DIR2 ... [--out DIR] [--names base,sft,rl]
    ./launch.sh eval-compare --paired OURS THEIRS [--names ours,nvidia] [--bootstrap-samples N]

Prints the table and writes compare.md, compare.json, metrics_per_checkpoint.png and proxy_vs_gold.png
(the training RM's win rate against the gold win rates, one point per checkpoint in the order given:
a proxy that climbs while gold stays flat or falls is reward over-optimisation) into --out (default: the
first dir's parent).

--paired: two evals of the same rows (e.g. our checkpoint and NVIDIA's released Llama-3.3-Nemotron-70B-Edit,
each scored with `./launch.sh eval model=http://...`). Rows are matched by id (rows failed or missing on
either side are left out and counted); for every metric both have, the difference A - B with a
paired-bootstrap 95% CI (the same resampled rows for both) and a verdict: "within" when the CI contains 0
(no difference shown), "outside" otherwise. Writes paired.md and paired.json.

Same scoring or no comparison: each report.json names what produced it (meta.provenance, eval/run.py).
Two reports whose data (manifest sha256), split, sampling (temperature, top_p, seed, max_new_tokens),
prompt budget or scorers (training RM, gold RM, judge: content fingerprint, or endpoint and served model)
differ are not comparable figure by figure: --paired refuses them with a one-line error naming the first
field that differs (--allow-mismatch turns that into warnings that lead the output and paired.md); the
side-by-side table always runs and leads with those warnings. A report without provenance (written before
it existed) is refused: rerun its eval.

Every file read is untrusted: a report.json or row file that is not what an eval writes, an --out that
cannot be written, or --bootstrap-samples < 1 is a one-line error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from hs3.io import UserError, atomic_write_json, atomic_write_text, cli_main, read_jsonl

from eval.metrics import GENERATION_METRICS, LIKELIHOOD_METRICS, ROW_FIELD, paired_difference
from eval.report import LABELS, fmt, fmt_ci, md_table, plot_metrics, plot_proxy_vs_gold


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_report(path: Path, report) -> dict:
    """A report.json as an eval writes it, or a one-line error naming what is not."""
    def bad(what: str):
        raise UserError(f"{path}: {what} (is it an eval's report.json?)")

    if not isinstance(report, dict):
        bad(f"a JSON {type(report).__name__}, not an object")
    for key in ("overall", "meta", "counts"):
        if not isinstance(report.get(key), dict):
            bad(f"{key} is {type(report.get(key)).__name__ if key in report else 'missing'}, not an object")
    for key, summary in report["overall"].items():
        if not isinstance(summary, dict):
            bad(f"overall.{key} is not an object")
        ci = summary.get("ci")
        if not _number(summary.get("value")) or not (isinstance(ci, list) and len(ci) == 2 and all(map(_number, ci))):
            bad(f"overall.{key} has no numeric value and ci [low, high]")
        if not isinstance(summary.get("n"), int) or isinstance(summary.get("n"), bool) or summary["n"] < 0:
            bad(f"overall.{key}.n is not a count")
    if not isinstance(report["counts"].get("rows", 0), int):
        bad("counts.rows is not a count")
    if not isinstance(report["meta"].get("provenance"), dict):
        raise UserError(f"{path}: no provenance (meta.provenance: which model, data, sampling and scorers produced "
                        f"it): written before reports carried it; rerun its eval")
    return report


# What must match for two reports' figures to be compared (meta.provenance paths), with their labels.
PROVENANCE_FIELDS = (
    ("data.manifest_sha256", "data (manifest sha256)"),
    ("data.split", "split"),
    ("sampling.temperature", "sampling temperature"),
    ("sampling.top_p", "sampling top_p"),
    ("sampling.seed", "sampling seed"),
    ("sampling.max_new_tokens", "max_new_tokens"),
    ("max_prompt_tokens", "prompt budget (max_prompt_tokens)"),
    ("scorers.proxy_rm", "training RM (proxy scorer)"),
    ("scorers.gold_rm", "gold reward model"),
    ("scorers.judge", "LLM judge"),
)


def _get(node, dotted: str):
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _scorer_identity(scorer):
    """What identifies a scorer, by the provenance field each part comes from: its content fingerprint (a
    local model), else its endpoint and served model; with its input format, kind, dtype and length (the
    same RM read or run another way scores otherwise)."""
    if not isinstance(scorer, dict):
        return scorer
    who = {"fingerprint": scorer["fingerprint"]} if scorer.get("fingerprint") else \
        {"path": scorer.get("path"), "served_model": scorer.get("served_model")}
    return {**who, **{key: scorer.get(key) for key in ("input", "kind", "dtype", "max_length", "template_sha256")}}


def provenance_differences(reports: dict[str, dict]) -> list[str]:
    """One line per provenance field on which a report differs from the first, naming the field (of a
    scorer, the parts of it that differ: scorers.gold_rm.dtype)."""
    (first_name, first), *others = reports.items()
    lines = []
    for name, report in others:
        for field, label in PROVENANCE_FIELDS:
            a, b = _get(first["meta"]["provenance"], field), _get(report["meta"]["provenance"], field)
            if field.startswith("scorers."):
                a, b = _scorer_identity(a), _scorer_identity(b)
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                parts = [key for key in dict.fromkeys([*a, *b]) if a.get(key) != b.get(key)]
                field = ", ".join(f"{field}.{key}" for key in parts)
                a, b = ((a.get(parts[0]), b.get(parts[0])) if len(parts) == 1 else
                        ({key: a.get(key) for key in parts}, {key: b.get(key) for key in parts}))
            lines.append(f"{label} differs ({field}): {first_name} {_short(a)} vs {name} {_short(b)}")
    return lines


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def load_reports(dirs: list[str], names: list[str] | None) -> dict[str, dict]:
    """report.json of each dir (checked: check_report), keyed by its display name."""
    if names and len(names) != len(dirs):
        raise UserError(f"--names has {len(names)} names for {len(dirs)} dirs")
    reports = {}
    for i, d in enumerate(dirs):
        path = Path(d) / "report.json"
        if not path.is_file():
            raise UserError(f"{d}: no report.json (is it an eval output dir?)")
        try:
            report = check_report(path, json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path}: not valid JSON") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
        name = names[i] if names else (Path(d).resolve().parent.name if Path(d).name == "eval" else Path(d).name)
        if name in reports:
            name = f"{name} ({d})"
        reports[name] = report
    return reports


def comparison(reports: dict[str, dict]) -> tuple[list[str], list[list[str]], dict]:
    """Table header, rows (one per metric any report has) and the same as JSON."""
    keys = [k for k, _, _ in GENERATION_METRICS + LIKELIHOOD_METRICS if any(k in r["overall"] for r in reports.values())]
    rows = [[LABELS[k]] + [fmt_ci(k, r["overall"].get(k)) for r in reports.values()] for k in keys]
    as_json = {name: {"dir_model": r["meta"].get("model"), "rows": r["counts"].get("rows"),
                      **{k: r["overall"].get(k) for k in keys}} for name, r in reports.items()}
    return ["metric"] + list(reports), rows, as_json


def _metric_value(value) -> bool:
    """A per-row metric as the eval writes it: a number, None, or a list of numbers (chrF++ statistics)."""
    return value is None or _number(value) or (isinstance(value, list) and all(map(_number, value)))


def load_rows(directory: str) -> dict[str, dict]:
    """The per-row records of an eval dir (generations.jsonl and likelihood.jsonl), keyed by row id;
    a line that is not such a record is a one-line error naming it."""
    rows: dict[str, dict] = {}
    for name in ("generations.jsonl", "likelihood.jsonl"):
        path = Path(directory) / name
        if not path.is_file():
            if name == "generations.jsonl":
                raise UserError(f"{directory}: no generations.jsonl (is it an eval output dir?)")
            continue
        try:
            lines = read_jsonl(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read ({type(exc).__name__})") from None
        for n, row in enumerate(lines, 1):
            metrics = row.get("metrics") if isinstance(row, dict) else None
            if not isinstance(metrics, dict) or not isinstance(row.get("id"), (str, int)) or isinstance(row["id"], bool):
                raise UserError(f"{path} line {n}: not an eval row (an object with id and metrics)")
            bad = next((k for k, v in metrics.items() if not _metric_value(v)), None)
            if bad is not None:
                raise UserError(f"{path} line {n}: metrics.{bad} is {_short(metrics[bad])}, not a number")
            rows[f"{name}:{row['id']}"] = row
    return rows


def writable_out(out: Path) -> Path:
    """--out, created if needed; a one-line error when it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create it ({exc.strerror or type(exc).__name__})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: not writable")
    return out


def paired_comparison(rows_a: dict[str, dict], rows_b: dict[str, dict], samples: int, seed: int = 0) -> dict:
    """Per metric both evals have on common rows: paired_difference over the rows both scored."""
    common = sorted(set(rows_a) & set(rows_b))
    usable = [k for k in common if rows_a[k].get("error") is None and rows_b[k].get("error") is None]
    metrics = {}
    for key, _, _ in GENERATION_METRICS + LIKELIHOOD_METRICS:
        field = ROW_FIELD[key]
        pairs = [(rows_a[k]["metrics"][field], rows_b[k]["metrics"][field]) for k in usable
                 if rows_a[k]["metrics"].get(field) is not None and rows_b[k]["metrics"].get(field) is not None]
        if pairs:
            metrics[key] = paired_difference([a for a, _ in pairs], [b for _, b in pairs], samples, seed, key=key)
    return {"matched_rows": len(common), "failed_rows_left_out": len(common) - len(usable),
            "only_in_a": len(set(rows_a) - set(rows_b)), "only_in_b": len(set(rows_b) - set(rows_a)),
            "bootstrap_samples": samples, "metrics": metrics}


def fmt_diff(key: str, result: dict) -> str:
    """'+d [low, high]' in the metric's unit."""
    low, high = result["ci"]
    return f"{'+' if result['diff'] >= 0 else ''}{fmt(key, result['diff'])} [{fmt(key, low)}, {fmt(key, high)}]"


def verdict_line(key: str, result: dict, name_a: str, name_b: str) -> str:
    """One line: the two figures, the difference with its CI, and whether the CI contains 0."""
    diff = fmt_diff(key, result)
    if result["verdict"] == "within":
        tail = "within the CI: no difference shown"
    else:
        tail = f"outside the CI: {name_a} {'higher' if result['diff'] > 0 else 'lower'}"
    return f"{LABELS[key]}: {name_a} {fmt(key, result['a'])} vs {name_b} {fmt(key, result['b'])}, diff {diff}: {tail}"


def paired_main(dirs: list[str], names: list[str] | None, out: Path, samples: int, allow_mismatch: bool = False) -> int:
    if len(dirs) != 2:
        raise UserError(f"--paired compares exactly two eval dirs ({len(dirs)} given)")
    reports = load_reports(dirs, names)
    name_a, name_b = list(reports)
    warnings = provenance_differences(reports)
    if warnings and not allow_mismatch:
        raise UserError(f"not comparable: {warnings[0]}" + (f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else "")
                        + "; score both the same way, or pass --allow-mismatch to compare anyway with warnings")
    for line in warnings:
        print(f"warning: {line}")
    try:
        result = paired_comparison(load_rows(dirs[0]), load_rows(dirs[1]), samples)
    except ValueError as exc:  # e.g. chrF++ statistics of another length on one side
        raise UserError(f"{dirs[0]} and {dirs[1]}: rows cannot be paired ({str(exc).splitlines()[0]})") from None
    if not result["metrics"]:
        raise UserError(f"{dirs[0]} and {dirs[1]} share no scored rows (same data dir and split? rows match by id)")
    lines = [verdict_line(k, r, name_a, name_b) for k, r in result["metrics"].items()]
    header = ["metric", name_a, name_b, f"{name_a} - {name_b} [95% CI]", "n", "verdict"]
    rows = [[LABELS[k], fmt(k, r["a"]), fmt(k, r["b"]), fmt_diff(k, r), str(r["n"]), r["verdict"]]
            for k, r in result["metrics"].items()]
    counts = (f"{result['matched_rows']} rows matched by id, {result['failed_rows_left_out']} left out (failed on a "
              f"side), {result['only_in_a']} only in {name_a}, {result['only_in_b']} only in {name_b}; paired "
              f"bootstrap, {samples} resamples")
    writable_out(out)
    warned = "".join(f"> warning: {line}\n" for line in warnings) + ("\n" if warnings else "")
    atomic_write_json(out / "paired.json", {"a": name_a, "b": name_b, "dirs": dirs, "warnings": warnings, **result})
    atomic_write_text(out / "paired.md", f"# Paired comparison: {name_a} vs {name_b}\n\n{warned}{counts}\n\n"
                      + md_table(header, rows) + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    print(counts)
    for line in lines:
        print(line)
    outside = sum(r["verdict"] == "outside" for r in result["metrics"].values())
    print(f"eval-compare --paired: {len(lines)} metrics, {outside} outside their CI -> {out}/paired.md")
    return 0


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./launch.sh eval-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="eval output dirs (each with report.json)")
    parser.add_argument("--out", help="where to write compare.md/json and the plot (default: first dir's parent)")
    parser.add_argument("--names", help="comma-separated column names, one per dir")
    parser.add_argument("--paired", action="store_true",
                        help="two dirs: per-metric differences on the same rows with paired-bootstrap CIs and a verdict")
    parser.add_argument("--bootstrap-samples", type=int, default=1000, help="resamples of the paired bootstrap")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="--paired: compare reports scored differently (data, split, sampling, scorers), with warnings")
    args = parser.parse_args(argv)
    if args.bootstrap_samples < 1:
        raise UserError(f"--bootstrap-samples={args.bootstrap_samples}: must be >= 1")
    out = Path(args.out) if args.out else Path(args.dirs[0]).resolve().parent
    names = args.names.split(",") if args.names else None
    if args.paired:
        return paired_main(args.dirs, names, out, args.bootstrap_samples, args.allow_mismatch)
    reports = load_reports(args.dirs, names)
    warnings = provenance_differences(reports) if len(reports) > 1 else []
    for line in warnings:
        print(f"warning: {line}")
    header, rows, as_json = comparison(reports)

    from rich.console import Console
    from rich.table import Table

    table = Table(title="eval comparison (value [95% CI])")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)

    writable_out(out)
    warned = "".join(f"> warning: {line}\n" for line in warnings) + ("\n" if warnings else "")
    atomic_write_text(out / "compare.md", "# Eval comparison (value [95% CI])\n\n" + warned + md_table(header, rows) + "\n")
    atomic_write_json(out / "compare.json", {**as_json, "warnings": warnings} if warnings else as_json)
    plot_metrics(reports, out / "metrics_per_checkpoint.png", "metrics per checkpoint")
    if plot_proxy_vs_gold(reports, out / "proxy_vs_gold.png"):
        print(f"proxy vs gold per checkpoint -> {out}/proxy_vs_gold.png")
    else:
        print("proxy vs gold: no report has both a training-RM and a gold win rate (eval.gold_rm / eval.judge_endpoint)")
    print(f"eval-compare: {len(reports)} checkpoints, {len(rows)} metrics -> {out}/compare.md")
    return 0
