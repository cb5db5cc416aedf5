"""The pipeline: a chain of stages from a preset (conf/pipeline/NAME.yaml, read by launcher.stages),
run locally (one subprocess per entry, in order) or on SLURM (one job per entry, chained with afterok).

    ./launch.sh pipeline [preset=NAME] [key=value ...] [NAME:key=value ...] [executor=slurm cluster=NAME] [--dry-run]
    ./launch.sh smoke    [key=value ...]

Presets: default (data -> sft -> rm -> rl -> eval); megatron (chosen by engine=megatron without preset=:
data, import -> sft -> sft_export, rm -> rl -> rl_export -> eval); smoke. `key=value` applies to every
entry; `NAME:key=value` to one entry of the chain (e.g. `sft:train.lr=1e-5`).
A stage whose output dir already holds a finished run of the same config is skipped, so a pipeline
that stopped half-way picks up where it stopped; an unfinished stage resumes from its checkpoint.
The smoke pipeline (conf/pipeline/smoke.yaml) starts from a clean runs/smoke every time: it clears a run
dir only when an earlier smoke created it (the .hs3-smoke file inside), and a dry run touches nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipes.config import REPO_ROOT, compose, to_yaml
from hs3.io import UserError, atomic_write_json
from launcher.stages import Entry, is_finished, load_preset  # noqa: F401  (is_finished: re-exported)

DEFAULT_PRESET = "default"
# engine=megatron without preset=: the Megatron chain (import -> sft -> export -> rm -> rl -> export -> eval).
ENGINE_PRESETS = {"megatron": "megatron"}


def split_args(args: list[str], names) -> tuple[list[str], dict[str, list[str]], bool, str | None]:
    """Common key=value args, per-entry `NAME:key=value` args, --dry-run, and preset=NAME."""
    common: list[str] = []
    per_entry: dict[str, list[str]] = {n: [] for n in names}
    dry_run, preset = False, None
    for arg in args:
        if arg == "--dry-run":
            dry_run = True
            continue
        if arg.startswith("preset="):
            preset = arg.split("=", 1)[1]
            continue
        head, sep, rest = arg.partition(":")
        if sep and "=" not in head and head in per_entry:
            per_entry[head].append(rest)
        elif sep and "=" not in head:
            raise UserError(f"{arg!r}: {head!r} is not a pipeline stage ({', '.join(names)})")
        else:
            common.append(arg)
    return common, per_entry, dry_run, preset


def preset_for(args: list[str], default: str = DEFAULT_PRESET) -> str:
    """preset=NAME if given; else the engine's chain for engine=ENGINE (e.g. megatron); else `default`."""
    chosen = None
    for arg in args:
        if arg.startswith("preset="):
            chosen = arg.split("=", 1)[1]
    if chosen:
        return chosen
    if default == DEFAULT_PRESET:
        engines = [a.split("=", 1)[1] for a in args if a.startswith("engine=")]
        if engines and engines[-1] in ENGINE_PRESETS:
            return ENGINE_PRESETS[engines[-1]]
    return default


def stage_args(preset: str, args: list[str]) -> tuple[dict[str, Entry], dict[str, list[str]], bool]:
    """The chain and the key=value list of each entry: preset, then the entry's own preset args, its
    placement (name, out), then the command line (common, then NAME:...)."""
    preset_common, chain = load_preset(preset_for(args, preset))
    common, per_entry, dry_run, _ = split_args(args, list(chain))
    return chain, {name: preset_common + list(e.args) + e.config_args() + common + per_entry[name]
                   for name, e in chain.items()}, dry_run


def run_local(chain: dict[str, Entry], entry_args: dict[str, list[str]]) -> list[dict]:
    """Run each entry as `python -m recipes STAGE ...`, in chain order, stopping at the first failure."""
    from rich.console import Console

    console = Console(stderr=True)
    rows = []
    for i, (name, entry) in enumerate(chain.items(), 1):
        args = entry_args[name]
        cfg = compose(entry.stage, args)
        console.rule(f"[bold]stage {i}/{len(chain)}: {name}[/bold]  -> {cfg.out}")
        if is_finished(cfg):
            summary = json.loads((Path(cfg.out) / "summary.json").read_text())
            console.print(f"{name}: finished earlier with the same config, skipped")
            rows.append({**summary, "stage": name, "wall_s": 0.0, "note": "skipped"})
            continue
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "launcher", entry.stage, *args], cwd=REPO_ROOT, env=os.environ.copy())
        wall = time.monotonic() - start
        if proc.returncode != 0:
            rows.append({"stage": name, "metric": "failed", "value": None, "wall_s": wall, "out": str(cfg.out)})
            print_table(rows, console)
            raise UserError(f"stage {name} failed (exit {proc.returncode}); later stages not run. "
                            f"Rerun the same command to resume from its last checkpoint.")
        summary = json.loads((Path(cfg.out) / "summary.json").read_text())
        rows.append({**summary, "stage": name, "wall_s": wall})
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


def hub_models(cfgs: dict) -> list[str]:
    """Hugging Face hub ids (not local dirs) the chain's Megatron jobs download: base model, tokenizer."""
    ids = []
    for cfg in cfgs.values():
        if cfg.engine != "megatron":
            continue
        for value in (cfg.model.path, cfg.megatron.hf_model_id):
            if value and "/" in value and not value.startswith(("/", ".", "builtin:")) and not Path(value).exists():
                ids.append(str(value))
    return sorted(set(ids))


def check_hf_token(cfgs: dict, dry_run: bool) -> None:
    """Jobs run with --no-container-mount-home, so ~/.cache/huggingface/token is not there: a gated model
    (Llama-3.3) needs HF_TOKEN in the environment sbatch passes to the job. Checked before submitting."""
    models = hub_models(cfgs)
    if not models or os.environ.get("HF_TOKEN") or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    message = (f"HF_TOKEN is not set: the jobs download {', '.join(models)} from the Hugging Face hub (gated), and run "
               "without your home directory's token; export HF_TOKEN=... before submitting (or HF_HUB_OFFLINE=1 with "
               "the model in HF_HOME)")
    if dry_run:
        print(f"# warning: {message}")
        return
    raise UserError(message)


def main(args: list[str], preset: str = DEFAULT_PRESET) -> int:
    chain, entry_args, dry_run = stage_args(preset, args)
    cfgs = {name: compose(e.stage, entry_args[name] + (["dry_run=true"] if dry_run else [])) for name, e in chain.items()}
    executor = {c.executor for c in cfgs.values()}
    if executor == {"slurm"}:
        check_hf_token(cfgs, dry_run)
        from launcher.slurm import submit_pipeline

        submit_pipeline(cfgs, {name: list(e.needs) for name, e in chain.items()}, dry_run=dry_run)
        return 0
    if executor != {"local"}:
        raise UserError(f"executor must be the same for every stage, got {sorted(executor)}")
    if dry_run:
        for name, cfg in cfgs.items():
            needs = f" (after {', '.join(chain[name].needs)})" if chain[name].needs else ""
            print(f"# {name}: python -m recipes {chain[name].stage} {' '.join(entry_args[name])}{needs}\n{to_yaml(cfg)}")
        return 0
    run_local(chain, entry_args)
    return 0


# The smoke writes this file into a run dir it creates; it clears a run dir only when the file is there.
SMOKE_MARKER = ".hs3-smoke"


def prepare_smoke_dir(run_dir: str | os.PathLike, dry_run: bool) -> Path:
    """The smoke starts from an empty run dir. It deletes one only when the smoke created it (SMOKE_MARKER
    inside), never through a symbolic link, and a dry run changes nothing on disk."""
    path = Path(os.path.abspath(run_dir))
    if path.is_symlink():
        raise UserError(f"run_dir={run_dir} is a symbolic link (to {os.readlink(path)}): the smoke clears its run "
                        "dir before it starts and never does so through a link; pass the directory itself")
    if path.exists() and not path.is_dir():
        raise UserError(f"run_dir={run_dir} exists and is not a directory")
    marked = (path / SMOKE_MARKER).is_file()
    if path.is_dir() and not marked and any(path.iterdir()):
        raise UserError(f"run_dir={run_dir} exists and was not created by the smoke (no {SMOKE_MARKER} in it): the "
                        "smoke starts from an empty run dir and deletes only one it made itself; pick another "
                        "run_dir= (or remove this one yourself)")
    if dry_run:
        if marked:
            print(f"# dry run: {path} (an earlier smoke's run dir) would be cleared first")
        return path
    if marked:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / SMOKE_MARKER, {"created_by": "./launch.sh smoke", "note": "the smoke clears this "
                                            "run dir on its next start; remove this file to keep the dir"})
    return path


def smoke_main(args: list[str]) -> int:
    """The whole pipeline on the tiny model and the bundled sample rows, from a clean run dir (runs/smoke)."""
    chain, entry_args, dry_run = stage_args("smoke", args)
    first = next(iter(chain))
    cfg = compose(chain[first].stage, entry_args[first])
    prepare_smoke_dir(cfg.run_dir, dry_run or cfg.dry_run)
    # A CPU-only demo: say so to DeepSpeed (instead of its detection warning in every stage), and keep
    # the libraries' deprecation notices to each other (TRL -> transformers) off the newcomer's screen.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    return main(args, preset="smoke")
