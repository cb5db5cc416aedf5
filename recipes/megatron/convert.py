"""convert: HF <-> Megatron checkpoints through Megatron-Bridge's AutoBridge.

    ./launch.sh convert model=llama33_70b [init=HF_DIR_OR_ID] [out=DIR] [--dry-run]                      (HF -> Megatron)
    ./launch.sh convert megatron.convert_direction=megatron_to_hf init=CKPT/iter_0000050 out=DIR [--dry-run]

Runs Megatron-Bridge's conversion CLI, scripts/conversion/convert.sh `import` / `export` (both call
AutoBridge.import_ckpt / export_ckpt), from the pinned checkout in the container. The export needs
the HF model id for the config and tokenizer it writes next to the weights (megatron.hf_model_id).
"""
from __future__ import annotations

import shlex
import time
import subprocess
from pathlib import Path

from recipes.config import ConfigError, to_yaml
from recipes.io import UserError, atomic_write_text
from recipes.megatron import job_nodes
from recipes.training import write_summary

DIRECTIONS = ("hf_to_megatron", "megatron_to_hf")
DEVICES = ("cpu", "gpu")


def _location(value: str) -> str:
    path = Path(value)
    return str(path.resolve()) if path.exists() or value.startswith((".", "/", "runs")) else value


def build_command(cfg) -> list[str]:
    m = cfg.megatron
    if m.convert_direction not in DIRECTIONS:
        raise ConfigError(f"megatron.convert_direction={m.convert_direction}: expected one of {', '.join(DIRECTIONS)}")
    if m.convert_device not in DEVICES:
        raise ConfigError(f"megatron.convert_device={m.convert_device}: expected one of {', '.join(DEVICES)}")
    script = str(Path(m.megatron_bridge_dir) / "scripts" / "conversion" / "convert.sh")
    out = str(Path(cfg.out).resolve())
    device = ["--executor", "local", "--device", m.convert_device]
    if m.convert_device == "gpu":
        device += ["--gpus-per-node", str(job_nodes(cfg)[1])]
    if m.convert_direction == "hf_to_megatron":
        source = _location(str(cfg.init or cfg.model.path))
        return ["bash", script, "import", *device, "--hf-model", source, "--megatron-path", out]
    if not cfg.init:
        raise ConfigError("megatron_to_hf needs init=PATH: the Megatron checkpoint iteration dir to export")
    if not m.hf_model_id:
        raise ConfigError("megatron_to_hf needs megatron.hf_model_id: the HF model whose config and tokenizer to write")
    return ["bash", script, "export", *device, "--hf-model", m.hf_model_id,
            "--megatron-path", _location(str(cfg.init)), "--hf-path", out]


def render(cfg) -> dict[str, str]:
    """config.yaml and command.sh in cfg.out (what a SLURM job runs)."""
    command = build_command(cfg)
    files = {str(Path(cfg.out) / "config.yaml"): to_yaml(cfg),
             str(Path(cfg.out) / "command.sh"): "#!/usr/bin/env bash\nset -euo pipefail\n" + shlex.join(command) + "\n"}
    for path, content in files.items():
        atomic_write_text(path, content)
    return files


def run(cfg) -> dict:
    render(cfg)
    command = build_command(cfg)
    if cfg.dry_run:
        print("command:", shlex.join(command))
        print(f"convert ({cfg.megatron.convert_direction}, dry run): wrote {Path(cfg.out) / 'command.sh'}; nothing was run")
        return {"stage": "convert", "metric": "dry_run", "value": 0, "out": cfg.out}
    start = time.monotonic()
    print("running:", shlex.join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode:
        raise UserError(f"Megatron-Bridge conversion exited with {result.returncode} (command: {shlex.join(command)})")
    return write_summary(cfg, "converted", 1.0, start, direction=cfg.megatron.convert_direction)
