"""python -m launcher COMMAND [key=value ...] [--config FILE.yaml] [--dry-run]   (./launch.sh forwards here)

  STAGE --help                     the stage's keys: type, value, one-line doc (launcher/help.py)
  config STAGE [k=v ...] [--only SECTION] [--diff]   the resolved config of a stage"""
from __future__ import annotations

import os
import sys

from hs3.io import UserError, cli_main
from launcher.run import load, run_stage
from recipes.config import STAGES, compose

# Commands that are not a single stage: "module:function(argv) -> exit code".
COMMANDS = {
    "config": "launcher.help:config_main",
    "plan": "recipes.megatron.plan:main",
    "pipeline": "launcher.pipeline:main",
    "smoke": "launcher.pipeline:smoke_main",
    "status": "launcher.status:main",
    "push": "launcher.push:main",
    "edit": "launcher.edit:main",
    "doctor": "launcher.doctor:main",
    "eval-compare": "eval.compare:main",
    "its-eval": "its.evaluate:main",
}
HELP = ("-h", "--help")


@cli_main
def main(argv: list[str]) -> int:
    if not argv or argv[0] in (*HELP, "help"):
        if len(argv) > 1 and argv[1] in STAGES:  # help STAGE
            return main([argv[1], "--help"])
        print(__doc__.strip())
        print(f"stages: {', '.join(STAGES)}\ncommands: {', '.join(COMMANDS)}")
        return 0
    command, args = argv[0], argv[1:]
    if command in COMMANDS:
        return load(COMMANDS[command])(args) or 0
    if command not in STAGES:
        from launcher.help import did_you_mean

        raise UserError(f"unknown command {command!r}{did_you_mean(command, [*STAGES, *COMMANDS, 'setup', 'test', 'lock', 'help'])} "
                        f"(stages: {', '.join(STAGES)}; commands: {', '.join(COMMANDS)})")
    if any(a in HELP for a in args):
        from launcher.help import stage_help

        print(stage_help(command, [a for a in args if a not in HELP and a != "--dry-run"]))
        return 0
    dry_run = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"] + (["dry_run=true"] if dry_run else [])
    cfg = compose(command, args)
    run_stage(cfg)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # `./launch.sh sft --help | head`: the reader has gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
