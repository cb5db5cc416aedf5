"""python -m recipes COMMAND [key=value ...] [--dry-run]   (./launch.sh forwards here)"""
from __future__ import annotations

import importlib
import os
import sys

from recipes.config import STAGES, compose
from hs3.io import UserError, cli_main

# (stage, engine) -> "module:function"; each function takes the resolved config and returns a
# summary dict for the closing table ({"metric": name, "value": number, "out": dir}).
STAGE_RUNNERS = {
    ("data", "hf"): "recipes.data:run",
    ("data", "megatron"): "recipes.data:run",
    ("sft", "hf"): "recipes.sft:run",
    ("rm", "hf"): "recipes.rm:run",
    ("rl", "hf"): "recipes.rl:run",
    ("dpo", "hf"): "recipes.dpo:run",
    ("feedback", "hf"): "recipes.feedback:run",
    ("select", "hf"): "recipes.select:run",
    ("feedback", "megatron"): "recipes.feedback:run_megatron",
    ("eval", "hf"): "eval.run:run",
    ("eval", "megatron"): "eval.run:run",
    ("its", "hf"): "its.loop:run",
    ("sft", "megatron"): "recipes.megatron.bridge_sft:run",
    ("convert", "megatron"): "recipes.megatron.convert:run",
    ("rm", "megatron"): "recipes.megatron.nemo_rl:run",
    ("rl", "megatron"): "recipes.megatron.nemo_rl:run",
    ("dpo", "megatron"): "recipes.megatron.nemo_rl:run",
}

# Commands that are not a single stage: "module:function(argv) -> exit code".
COMMANDS = {
    "plan": "recipes.megatron.plan:main",
    "pipeline": "recipes.pipeline:main",
    "smoke": "recipes.pipeline:smoke_main",
    "status": "recipes.slurm:status_main",
    "doctor": "recipes.doctor:main",
    "eval-compare": "eval.compare:main",
    "its-eval": "its.evaluate:main",
}


def load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def run_stage(cfg) -> dict:
    """Run one stage of a resolved config on this machine (or render/submit it on SLURM)."""
    if cfg.executor == "slurm":
        return load("recipes.slurm:submit_stage")(cfg)
    key = (cfg.stage, cfg.engine)
    if key not in STAGE_RUNNERS:
        raise UserError(f"stage {cfg.stage} has no {cfg.engine} engine (try engine=megatron or engine=hf)")
    runner = load(STAGE_RUNNERS[key])
    from recipes import preemption

    if cfg.stage not in preemption.TRAINING_STAGES or cfg.dry_run:
        return runner(cfg)
    # Training stages: USR1 / the batch script's request file -> checkpoint, exit 75, requeue;
    # and one writer per output dir (recipes/preemption.py).
    preemption.install_signal_handler()
    with preemption.OutputLock(cfg.out):
        if "SLURM_JOB_ID" not in os.environ:  # in a job, the batch script clears it before starting
            preemption.clear_request(cfg.out)
        return runner(cfg)


@cli_main
def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        print(f"stages: {', '.join(STAGES)}; commands: {', '.join(COMMANDS)}")
        return 0
    command, args = argv[0], argv[1:]
    if command in COMMANDS:
        return load(COMMANDS[command])(args) or 0
    if command not in STAGES:
        raise UserError(f"unknown command {command!r} (stages: {', '.join(STAGES)}; commands: {', '.join(COMMANDS)})")
    dry_run = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"] + (["dry_run=true"] if dry_run else [])
    cfg = compose(command, args)
    run_stage(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
