"""convert: HF <-> Megatron checkpoints (Megatron-Bridge) and NeMo-RL checkpoints -> HF.

    ./launch.sh convert model=llama33_70b [init=HF_DIR_OR_ID] [out=DIR] [--dry-run]                    (HF -> Megatron)
    ./launch.sh convert megatron.convert_direction=megatron_to_hf init=RUN/sft/checkpoints megatron.convert_dest=RUN/sft/final
    ./launch.sh convert megatron.convert_direction=nemo_rl_to_hf init=RUN/rm/checkpoints megatron.convert_dest=RUN/rm/final

Directions:
  hf_to_megatron, megatron_to_hf: Megatron-Bridge's conversion worker, scripts/conversion/run_conversion.py
    `import` / `export` (AutoBridge.import_ckpt / export_ckpt), called with the container's python: its
    launcher convert.sh wraps it in `uv run --with nemo-run==0.10.0` (convert.sh:45-56), which needs a
    package index that compute nodes often lack, and NeMo Run, which a one-process conversion does not.
    An export reads a checkpoint dir with iter_* folders and takes the latest
    (auto_bridge.py:1319-1330 at v0.6.0).
  nemo_rl_to_hf: `python -m recipes.megatron.convert --checkpoints DIR ...` picks the NeMo-RL step (the
    best by its checkpointing metric with megatron.convert_select=best, else the latest: NeMo-RL's own rule,
    nemo_rl/utils/checkpoint.py:315-372 at v0.7.0) and runs NeMo-RL's converter for that step's backend:
    examples/converters/convert_dcp_to_hf.py (DTensor: the reward model) or convert_megatron_to_hf.py
    (Megatron policy: rl, dpo).
The converted model goes to megatron.convert_dest (default OUT/converted). Megatron-Bridge refuses a
non-empty destination (scripts/conversion/utils.py:153-156, "Destination is not empty"), so this
stage's own files (config.yaml, command.sh, summary.json) are written to OUT, beside it, never inside.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from recipes.config import ConfigError, to_yaml
from hs3.io import UserError, atomic_write_text
from recipes.megatron import job_nodes
from recipes.training import write_summary

DIRECTIONS = ("hf_to_megatron", "megatron_to_hf", "nemo_rl_to_hf")
DEVICES = ("cpu", "gpu")
WORKER = Path("scripts") / "conversion" / "run_conversion.py"  # Megatron-Bridge's conversion worker
CONVERTERS = Path("examples") / "converters"                    # NeMo-RL's checkpoint converters


def _location(value: str) -> str:
    path = Path(value)
    return str(path.resolve()) if path.exists() or value.startswith((".", "/", "runs")) else value


def out_dir(cfg) -> Path:
    return Path(cfg.out).resolve()


def destination(cfg) -> Path:
    """The directory the conversion writes: megatron.convert_dest, else OUT/converted."""
    dest = Path(cfg.megatron.convert_dest).resolve() if cfg.megatron.convert_dest else out_dir(cfg) / "converted"
    out = out_dir(cfg)
    if dest == out or dest in out.parents:
        raise ConfigError(f"megatron.convert_dest={dest}: the conversion's destination must not be the stage's "
                          f"output dir {out} (or above it): its config.yaml and command.sh would be in it, "
                          "and Megatron-Bridge refuses a non-empty destination")
    return dest


def build_command(cfg) -> list[str]:
    m = cfg.megatron
    if m.convert_direction not in DIRECTIONS:
        raise ConfigError(f"megatron.convert_direction={m.convert_direction}: expected one of {', '.join(DIRECTIONS)}")
    if m.convert_select not in ("best", "latest"):
        raise ConfigError(f"megatron.convert_select={m.convert_select}: expected best or latest")
    if m.convert_device not in DEVICES:
        raise ConfigError(f"megatron.convert_device={m.convert_device}: expected one of {', '.join(DEVICES)}")
    dest = str(destination(cfg))
    if m.convert_direction == "nemo_rl_to_hf":
        if not cfg.init:
            raise ConfigError("nemo_rl_to_hf needs init=PATH: the NeMo-RL stage's checkpoints dir (RUN_DIR/rm/checkpoints)")
        return ["python", "-m", "recipes.megatron.convert", "--checkpoints", _location(str(cfg.init)), "--dest", dest,
                "--converters", str(Path(m.nemo_rl_dir) / CONVERTERS), "--select", m.convert_select]
    worker = str(Path(m.megatron_bridge_dir) / WORKER)
    launcher = ["python", worker]
    if m.convert_device == "gpu":  # the GPU backend is distributed: one process per GPU of the node
        launcher = ["torchrun", "--standalone", f"--nproc-per-node={job_nodes(cfg)[1]}", worker]
    if m.convert_direction == "hf_to_megatron":
        source = _location(str(cfg.init or cfg.model.path))
        return [*launcher, "import", "--device", m.convert_device, "--hf-model", source, "--megatron-path", dest]
    if not cfg.init:
        raise ConfigError("megatron_to_hf needs init=PATH: the Megatron checkpoint dir to export (its latest iter_*)")
    if not m.hf_model_id:
        raise ConfigError("megatron_to_hf needs megatron.hf_model_id: the HF model whose config and tokenizer to write")
    return [*launcher, "export", "--device", m.convert_device, "--hf-model", m.hf_model_id,
            "--megatron-path", _location(str(cfg.init)), "--hf-path", dest]


def render(cfg) -> dict[str, str]:
    """config.yaml and command.sh in OUT (what a SLURM job runs); the destination is left untouched."""
    command = build_command(cfg)
    out = out_dir(cfg)
    files = {str(out / "config.yaml"): to_yaml(cfg),
             str(out / "command.sh"): "#!/usr/bin/env bash\nset -euo pipefail\n" + shlex.join(command) + "\n"}
    for path, content in files.items():
        atomic_write_text(path, content)
    return files


def run(cfg) -> dict:
    render(cfg)
    command = build_command(cfg)
    dest = destination(cfg)
    if cfg.dry_run:
        print("command:", shlex.join(command))
        print(f"convert ({cfg.megatron.convert_direction}, dry run): wrote {out_dir(cfg) / 'command.sh'}; "
              f"would write {dest}; nothing was run")
        return {"stage": "convert", "metric": "dry_run", "value": 0, "out": cfg.out}
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest}: the conversion's destination is not empty (remove it to convert again)")
    start = time.monotonic()
    print("running:", shlex.join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode:
        raise UserError(f"conversion exited with {result.returncode} (command: {shlex.join(command)})")
    return write_summary(cfg, "converted", 1.0, start, direction=cfg.megatron.convert_direction, dest=str(dest))


# ---- in the container: NeMo-RL checkpoint -> HF ------------------------------------------------------

def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def select_step(checkpoints: Path, select: str) -> Path:
    """NeMo-RL's step_N dir to export: the latest, or the best by the run's checkpointing metric
    (metric_name / higher_is_better from the step's config.yaml; steps without it are skipped, and
    none with it means the latest), as NeMo-RL's CheckpointManager.get_best_checkpoint_path."""
    import yaml

    steps = sorted((p for p in checkpoints.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir()), key=_step)
    if not steps:
        raise UserError(f"{checkpoints}: no NeMo-RL step_N checkpoint (did the stage save one?)")
    if select == "latest":
        return steps[-1]
    config = yaml.safe_load((steps[-1] / "config.yaml").read_text()) if (steps[-1] / "config.yaml").is_file() else {}
    ckpt = (config or {}).get("checkpointing") or {}
    metric, higher = ckpt.get("metric_name"), bool(ckpt.get("higher_is_better"))
    scored = []
    for step in steps:
        info_file = step / "training_info.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if metric and metric in info:
            scored.append((info[metric], step))
    if not scored:
        return steps[-1]
    return (max if higher else min)(scored, key=lambda s: s[0])[1]


def converter_command(step: Path, dest: Path, converters: Path) -> list[str]:
    """NeMo-RL's converter for the step's backend (its config.yaml: policy.megatron_cfg.enabled)."""
    import yaml

    config_file = step / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{config_file}: no such file (a NeMo-RL checkpoint step holds its config)")
    policy = (yaml.safe_load(config_file.read_text()) or {}).get("policy") or {}
    weights = step / "policy" / "weights"
    if (policy.get("megatron_cfg") or {}).get("enabled"):
        iters = sorted((p for p in weights.glob("iter_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
        source = iters[-1] if iters else weights
        return ["python", str(converters / "convert_megatron_to_hf.py"), "--config", str(config_file),
                "--megatron-ckpt-path", str(source), "--hf-ckpt-path", str(dest)]
    return ["python", str(converters / "convert_dcp_to_hf.py"), "--config", str(config_file),
            "--dcp-ckpt-path", str(weights), "--hf-ckpt-path", str(dest)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a NeMo-RL checkpoint to an HF model dir (inside NeMo-RL's container)")
    parser.add_argument("--checkpoints", required=True, help="the stage's checkpoint_dir (step_N/ inside)")
    parser.add_argument("--dest", required=True)
    parser.add_argument("--converters", required=True, help="NeMo-RL's examples/converters")
    parser.add_argument("--select", choices=("best", "latest"), default="latest")
    args = parser.parse_args(argv)
    step = select_step(Path(args.checkpoints), args.select)
    command = converter_command(step, Path(args.dest), Path(args.converters))
    print(f"convert: {args.select} NeMo-RL checkpoint {step} -> {args.dest}\nrunning: {shlex.join(command)}", flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    from hs3.io import cli_main

    sys.exit(cli_main(main)(sys.argv[1:]))
