"""Which code runs a stage, and `python -m launcher.run CONFIG.yaml`: a SLURM job's one process
running the frozen config the launcher wrote at submission."""
from __future__ import annotations

import importlib
import sys

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


def load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def run_stage(cfg) -> dict:
    """Run one stage of a resolved config on this machine (or render/submit it on SLURM)."""
    if cfg.executor == "slurm":
        return load("launcher.slurm:submit_stage")(cfg)
    key = (cfg.stage, cfg.engine)
    if key not in STAGE_RUNNERS:
        others = [engine for (stage, engine) in STAGE_RUNNERS if stage == cfg.stage]
        raise UserError(f"stage {cfg.stage} has no {cfg.engine} engine (it runs on engine={' or engine='.join(others)})")
    from recipes import preemption

    return preemption.run_guarded(cfg, load(STAGE_RUNNERS[key]))


def main(argv: list[str]) -> int:
    """`python -m launcher.run CONFIG.yaml` (what a SLURM job runs)."""
    from recipes.training import load_resolved_config

    if len(argv) != 1:
        raise UserError("usage: python -m launcher.run RESOLVED_CONFIG.yaml")
    run_stage(load_resolved_config(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main)(sys.argv[1:]))
