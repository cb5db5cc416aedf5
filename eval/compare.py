"""Side-by-side table of several eval dirs (checkpoints: base, sft, rl, dpo, ...).

    ./launch.sh eval-compare DIR1 DIR2 ... [--out DIR] [--names base,sft,rl]

Prints the table and writes compare.md, compare.json and metrics_per_checkpoint.png into --out
(default: the first dir's parent).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipes.io import UserError, atomic_write_json, atomic_write_text, cli_main

from eval.metrics import GENERATION_METRICS, LIKELIHOOD_METRICS
from eval.report import LABELS, fmt_ci, md_table, plot_metrics


def load_reports(dirs: list[str], names: list[str] | None) -> dict[str, dict]:
    if names and len(names) != len(dirs):
        raise UserError(f"--names has {len(names)} names for {len(dirs)} dirs")
    reports = {}
    for i, d in enumerate(dirs):
        path = Path(d) / "report.json"
        if not path.is_file():
            raise UserError(f"{d}: no report.json (is it an eval output dir?)")
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{path}: not valid JSON") from None
        name = names[i] if names else (Path(d).resolve().parent.name if Path(d).name == "eval" else Path(d).name)
        if name in reports:
            name = f"{name} ({d})"
        reports[name] = report
    return reports


def comparison(reports: dict[str, dict]) -> tuple[list[str], list[list[str]], dict]:
    """Table header, rows (one per metric any report has) and the same as JSON."""
    keys = [k for k, _, _ in GENERATION_METRICS + LIKELIHOOD_METRICS if any(k in r["overall"] for r in reports.values())]
    rows = [[LABELS[k]] + [fmt_ci(k, r["overall"].get(k)) for r in reports.values()] for k in keys]
    as_json = {name: {"dir_model": r["meta"]["model"], "rows": r["counts"]["rows"],
                      **{k: r["overall"].get(k) for k in keys}} for name, r in reports.items()}
    return ["metric"] + list(reports), rows, as_json


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./launch.sh eval-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="eval output dirs (each with report.json)")
    parser.add_argument("--out", help="where to write compare.md/json and the plot (default: first dir's parent)")
    parser.add_argument("--names", help="comma-separated column names, one per dir")
    args = parser.parse_args(argv)
    reports = load_reports(args.dirs, args.names.split(",") if args.names else None)
    header, rows, as_json = comparison(reports)
    out = Path(args.out) if args.out else Path(args.dirs[0]).resolve().parent

    from rich.console import Console
    from rich.table import Table

    table = Table(title="eval comparison (value [95% CI])")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)

    atomic_write_text(out / "compare.md", "# Eval comparison (value [95% CI])\n\n" + md_table(header, rows) + "\n")
    atomic_write_json(out / "compare.json", as_json)
    plot_metrics(reports, out / "metrics_per_checkpoint.png", "metrics per checkpoint")
    print(f"eval-compare: {len(reports)} checkpoints, {len(rows)} metrics -> {out}/compare.md")
    return 0
