"""The pipeline: data -> sft -> rm -> rl -> eval, locally (one subprocess per stage) or on SLURM.

    ./launch.sh pipeline [key=value ...] [STAGE:key=value ...] [executor=slurm cluster=NAME] [--dry-run]
    ./launch.sh smoke    [key=value ...]

`key=value` applies to every stage; `STAGE:key=value` to one stage (e.g. `sft:train.lr=1e-5`).
A stage whose output dir already holds a finished run of the same config is skipped, so a pipeline
that stopped half-way picks up where it stopped; an unfinished stage resumes from its checkpoint.
The smoke pipeline (conf/pipeline/smoke.yaml) starts from a clean runs/smoke every time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from recipes.config import CONF_DIR, REPO_ROOT, compose, to_yaml
from recipes.io import UserError

PIPELINE_STAGES = ("data", "sft", "rm", "rl", "eval")


def split_args(args: list[str]) -> tuple[list[str], dict[str, list[str]], bool]:
    """Common key=value args, per-stage `STAGE:key=value` args, and --dry-run."""
    common: list[str] = []
    per_stage: dict[str, list[str]] = {s: [] for s in PIPELINE_STAGES}
    dry_run = False
    for arg in args:
        if arg == "--dry-run":
            dry_run = True
            continue
        head, sep, rest = arg.partition(":")
        if sep and "=" not in head and head in per_stage:
            per_stage[head].append(rest)
        elif sep and "=" not in head:
            raise UserError(f"{arg!r}: {head!r} is not a pipeline stage ({', '.join(PIPELINE_STAGES)})")
        else:
            common.append(arg)
    return common, per_stage, dry_run


def load_preset(name: str) -> tuple[list[str], dict[str, list[str]]]:
    """conf/pipeline/NAME.yaml: `args` for every stage and `stages.STAGE` args for one."""
    path = CONF_DIR / "pipeline" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"pipeline preset {name!r}: no such file {path}")
    preset = OmegaConf.to_container(OmegaConf.load(path))
    stages = preset.get("stages") or {}
    return list(preset.get("args") or []), {s: list(stages.get(s) or []) for s in PIPELINE_STAGES}


def stage_args(preset: str, args: list[str]) -> tuple[dict[str, list[str]], bool]:
    """The key=value list of each stage: preset first, then the command line."""
    preset_common, preset_stages = load_preset(preset)
    common, per_stage, dry_run = split_args(args)
    return {s: preset_common + preset_stages[s] + common + per_stage[s] for s in PIPELINE_STAGES}, dry_run


def is_finished(cfg) -> bool:
    """A stage is finished when it wrote summary.json under the very same config."""
    out = Path(cfg.out)
    config_file = out / "config.yaml"
    return (out / "summary.json").is_file() and config_file.is_file() and config_file.read_text() == to_yaml(cfg)


def run_local(stages: dict[str, list[str]]) -> list[dict]:
    """Run each stage as `python -m recipes STAGE ...`, in order, stopping at the first failure."""
    from rich.console import Console

    console = Console(stderr=True)
    rows = []
    for i, (stage, args) in enumerate(stages.items(), 1):
        cfg = compose(stage, args)
        console.rule(f"[bold]stage {i}/{len(stages)}: {stage}[/bold]  -> {cfg.out}")
        if is_finished(cfg):
            summary = json.loads((Path(cfg.out) / "summary.json").read_text())
            console.print(f"{stage}: finished earlier with the same config, skipped")
            rows.append({**summary, "wall_s": 0.0, "note": "skipped"})
            continue
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "recipes", stage, *args], cwd=REPO_ROOT, env=os.environ.copy())
        wall = time.monotonic() - start
        if proc.returncode != 0:
            rows.append({"stage": stage, "metric": "failed", "value": None, "wall_s": wall, "out": str(cfg.out)})
            print_table(rows, console)
            raise UserError(f"stage {stage} failed (exit {proc.returncode}); later stages not run. "
                            f"Rerun the same command to resume from its last checkpoint.")
        summary = json.loads((Path(cfg.out) / "summary.json").read_text())
        rows.append({**summary, "wall_s": wall})
    print_table(rows, console)
    return rows


def print_table(rows: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="pipeline summary")
    for column in ("stage", "wall time", "key metric", "output dir"):
        table.add_column(column)
    for row in rows:
        value = row.get("value")
        metric = row.get("metric", "")
        shown = f"{metric} = {value:.4g}" if isinstance(value, (int, float)) else str(metric)
        table.add_row(row["stage"], f"{row['wall_s']:.1f} s", shown + (f" ({row['note']})" if row.get("note") else ""),
                      str(row.get("out", "")))
    console.print(table)


def main(args: list[str], preset: str = "default") -> int:
    stages, dry_run = stage_args(preset, args)
    cfgs = {stage: compose(stage, a + (["dry_run=true"] if dry_run else [])) for stage, a in stages.items()}
    executor = {c.executor for c in cfgs.values()}
    if executor == {"slurm"}:
        from recipes.slurm import submit_pipeline

        submit_pipeline(cfgs, stages, dry_run=dry_run)
        return 0
    if executor != {"local"}:
        raise UserError(f"executor must be the same for every stage, got {sorted(executor)}")
    if dry_run:
        for stage, cfg in cfgs.items():
            print(f"# {stage}: python -m recipes {stage} {' '.join(stages[stage])}\n{to_yaml(cfg)}")
        return 0
    run_local(stages)
    return 0


def smoke_main(args: list[str]) -> int:
    """The whole pipeline on the tiny model and the bundled sample rows, from a clean runs/smoke."""
    stages, _ = stage_args("smoke", args)
    run_dir = Path(compose("data", stages["data"]).run_dir).resolve()
    if run_dir.exists():
        if "smoke" not in run_dir.name:  # never wipe a directory the user named for something else
            raise UserError(f"run_dir={run_dir}: the smoke pipeline only clears a run_dir named *smoke*")
        shutil.rmtree(run_dir)
    # A CPU-only demo: say so to DeepSpeed (instead of its detection warning in every stage), and keep
    # the libraries' deprecation notices to each other (TRL -> transformers) off the newcomer's screen.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    return main(args, preset="smoke")
