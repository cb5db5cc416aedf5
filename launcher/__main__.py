"""python -m launcher COMMAND [key=value ...] [--dry-run]   (./launch.sh forwards here)"""
from __future__ import annotations

import sys

from hs3.io import UserError, cli_main
from launcher.run import load, run_stage
from recipes.config import STAGES, compose

# Commands that are not a single stage: "module:function(argv) -> exit code".
COMMANDS = {
    "plan": "recipes.megatron.plan:main",
    "pipeline": "launcher.pipeline:main",
    "smoke": "launcher.pipeline:smoke_main",
    "status": "launcher.status:main",
    "doctor": "launcher.doctor:main",
    "eval-compare": "eval.compare:main",
    "its-eval": "its.evaluate:main",
}


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
