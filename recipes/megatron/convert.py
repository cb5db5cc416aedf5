"""convert: HF <-> Megatron checkpoints (Megatron-Bridge) and NeMo-RL checkpoints -> HF.

    ./launch.sh convert model=llama33_70b [init=HF_DIR_OR_ID] [out=DIR] [--dry-run]                    (HF -> Megatron)
    ./launch.sh convert megatron.convert_direction=megatron_to_hf init=RUN/sft/checkpoints megatron.convert_dest=RUN/sft/final
    ./launch.sh convert megatron.convert_direction=nemo_rl_to_hf init=RUN/rm/checkpoints megatron.convert_dest=RUN/rm/final

Directions (the "worker": the upstream program that writes the converted model, `build_command`):
  hf_to_megatron, megatron_to_hf: Megatron-Bridge's conversion worker, scripts/conversion/run_conversion.py
    `import` / `export` (AutoBridge.import_ckpt / export_ckpt), called with the container's python: its
    launcher convert.sh wraps it in `uv run --with nemo-run==0.10.0` (convert.sh:45-56), which needs a
    package index that compute nodes often lack, and NeMo Run, which a one-process conversion does not.
    An export reads a checkpoint dir with iter_* folders and takes the latest
    (auto_bridge.py:1319-1330 at v0.6.0).
  nemo_rl_to_hf: `python -m recipes.megatron.convert --checkpoints DIR ...` picks the NeMo-RL step (the
    best by its checkpointing metric with megatron.convert_select=best, else the latest: NeMo-RL's own rule,
    nemo_rl/utils/checkpoint.py:315-372 at v0.7.0) and runs NeMo-RL's converter for that step's backend:
    examples/converters/convert_dcp_to_hf.py (DTensor: the reward model) in the image's default python,
    or convert_megatron_to_hf.py (Megatron policy: rl, dpo) in the image's Megatron environment
    (MCORE_PYTHON, below). A reward model then gets its own config.json (`write_reward_model_config`).

Run once, never twice into the same place (`convert_once`, what the stage and its SLURM job run):
  * The conversion writes a staging dir beside the destination (.NAME.converting), which is renamed onto
    the destination only when the worker succeeded: a destination is either absent/empty or a complete
    conversion. Megatron-Bridge refuses a non-empty destination (scripts/conversion/utils.py:153-156,
    prepare_output_directory) and NeMo-RL's converters any existing one, even empty
    (native_checkpoint.py:235-238, community_import.py:213-216); a fresh staging path suits both.
  * OUT/summary.json records the source's and the destination's fingerprints (`tree_fingerprint`). The
    stage is finished (`is_current`; launcher/stages.py's is_finished asks it) when the destination still
    holds what that record says and the source is unchanged: a resubmitted chain does not run it again.
  * A destination that holds anything else (another source's conversion, a user's files, a conversion
    from before this record) is refused with a one-line error and left as it is. Nothing the user named
    is deleted; only a staging dir this stage created (named by its marker file) is cleared on a retry.
The stage's own files (config.yaml, command.sh, summary.json, .lock) are in OUT, beside the destination.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from recipes.config import ConfigError, to_yaml
from hs3.io import UserError, atomic_write_json, atomic_write_text
from recipes.megatron import job_nodes

DIRECTIONS = ("hf_to_megatron", "megatron_to_hf", "nemo_rl_to_hf")
DEVICES = ("cpu", "gpu")
WORKER = Path("scripts") / "conversion" / "run_conversion.py"  # Megatron-Bridge's conversion worker
CONVERTERS = Path("examples") / "converters"                    # NeMo-RL's checkpoint converters
# NeMo-RL's image syncs its default venv without the `mcore` extra (docker/Dockerfile:183-193 at v0.7.0:
# the last `uv sync` has --all-groups and no --extra mcore), yet convert_megatron_to_hf.py imports
# megatron.bridge ("this script requires mcore", its header). The image's prefetched Megatron worker venv
# (ACTOR_ENVIRONMENT_REGISTRY: MegatronPolicyWorker -> `uv run --locked --extra mcore`) has it, and
# prefetch_venvs.py puts a `python-<Worker>` launcher for it on PATH when NRL_CONTAINER is set (the
# Dockerfile sets it): NeMo-RL's "frozen environment" (docs/design-docs/dependency-management.md:223-263).
MCORE_PYTHON = "python-MegatronPolicyWorker"
SMALL_FILE = 1 << 16  # files up to this size are fingerprinted by content, larger ones by size and mtime


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


def staging_dir(dest: Path) -> Path:
    """Where the worker writes; renamed onto `dest` when it succeeded (same file system, one rename)."""
    return dest.parent / f".{dest.name}.converting"


def staging_marker(dest: Path) -> Path:
    """Written before the worker starts: says which staging dir this stage created (and may clear)."""
    return dest.parent / f".{dest.name}.converting.json"


def source(cfg) -> str:
    """What is converted: a local dir (absolute) or a hub id."""
    if cfg.megatron.convert_direction == "hf_to_megatron":
        return _location(str(cfg.init or cfg.model.path))
    return _location(str(cfg.init))


def _validate(cfg) -> None:
    m = cfg.megatron
    if m.convert_direction not in DIRECTIONS:
        raise ConfigError(f"megatron.convert_direction={m.convert_direction}: expected one of {', '.join(DIRECTIONS)}")
    if m.convert_select not in ("best", "latest"):
        raise ConfigError(f"megatron.convert_select={m.convert_select}: expected best or latest")
    if m.convert_device not in DEVICES:
        raise ConfigError(f"megatron.convert_device={m.convert_device}: expected one of {', '.join(DEVICES)}")
    if m.convert_direction == "nemo_rl_to_hf" and not cfg.init:
        raise ConfigError("nemo_rl_to_hf needs init=PATH: the NeMo-RL stage's checkpoints dir (RUN_DIR/rm/checkpoints)")
    if m.convert_direction == "megatron_to_hf":
        if not cfg.init:
            raise ConfigError("megatron_to_hf needs init=PATH: the Megatron checkpoint dir to export (its latest iter_*)")
        if not m.hf_model_id:
            raise ConfigError("megatron_to_hf needs megatron.hf_model_id: the HF model whose config and tokenizer to write")


def build_command(cfg, dest: Path | None = None) -> list[str]:
    """The worker's command, writing `dest` (default: the destination; `convert_once` passes the staging dir)."""
    _validate(cfg)
    m = cfg.megatron
    dest = str(dest or destination(cfg))
    if m.convert_direction == "nemo_rl_to_hf":
        return ["python", "-m", "recipes.megatron.convert", "--checkpoints", source(cfg), "--dest", dest,
                "--converters", str(Path(m.nemo_rl_dir) / CONVERTERS), "--select", m.convert_select]
    worker = str(Path(m.megatron_bridge_dir) / WORKER)
    launcher = ["python", worker]
    if m.convert_device == "gpu":  # the GPU backend is distributed: one process per GPU of the node
        launcher = ["torchrun", "--standalone", f"--nproc-per-node={job_nodes(cfg)[1]}", worker]
    if m.convert_direction == "hf_to_megatron":
        return [*launcher, "import", "--device", m.convert_device, "--hf-model", source(cfg), "--megatron-path", dest]
    return [*launcher, "export", "--device", m.convert_device, "--hf-model", m.hf_model_id,
            "--megatron-path", source(cfg), "--hf-path", dest]


def config_path(cfg) -> Path:
    return out_dir(cfg) / "config.yaml"


def job_command(cfg) -> list[str]:
    """What the SLURM job runs: `convert_once` on the stage's config (the worker runs inside it)."""
    build_command(cfg)  # a config the worker cannot run is an error at submission, not in the job
    return ["python", "-m", "recipes.megatron.convert", "--stage-config", str(config_path(cfg))]


def render(cfg) -> dict[str, str]:
    """config.yaml and command.sh in OUT (what a SLURM job runs); the destination is left untouched."""
    command = job_command(cfg)
    files = {str(config_path(cfg)): to_yaml(cfg),
             str(out_dir(cfg) / "command.sh"): "#!/usr/bin/env bash\nset -euo pipefail\n" + shlex.join(command) + "\n"}
    for path, content in files.items():
        atomic_write_text(path, content)
    return files


def run(cfg) -> dict:
    render(cfg)
    if cfg.dry_run:
        print("command:", shlex.join(build_command(cfg)))
        print(f"convert ({cfg.megatron.convert_direction}, dry run): wrote {out_dir(cfg) / 'command.sh'}; "
              f"would write {destination(cfg)}; nothing was run")
        return {"stage": "convert", "metric": "dry_run", "value": 0, "out": cfg.out}
    return convert_once(cfg)


# ---- once, and only into an empty place ----------------------------------------------------------------

def tree_fingerprint(location: str) -> dict:
    """What a source or a destination holds, cheaply: a hub id is its name; a file or directory is the
    sha256 over every file's relative path, size and mtime, and the content of files up to SMALL_FILE
    (configs, trackers, training_info.json). A 70B checkpoint is never read whole."""
    path = Path(location)
    if not path.exists():
        if path.is_absolute():
            return {"location": location, "missing": True}
        return {"location": location, "hub": True}
    digest = hashlib.sha256()
    files = size = 0
    entries = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in entries:
        stat = file.stat()
        rel = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if stat.st_size <= SMALL_FILE:
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        files += 1
        size += stat.st_size
    return {"location": location, "sha256": digest.hexdigest(), "files": files, "bytes": size}


def _summary(cfg) -> dict | None:
    try:
        summary = json.loads((out_dir(cfg) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def worker_key(cfg) -> list[str]:
    """The worker's command with the place it writes left out: what decides the conversion's result."""
    return build_command(cfg, Path("DEST"))


def is_current(cfg) -> bool:
    """The destination holds a complete conversion, by the same worker command, of the source as it is
    now (OUT/summary.json's record)."""
    summary = _summary(cfg)
    if not summary or "dest_fingerprint" not in summary:
        return False
    dest = destination(cfg)
    if summary.get("dest") != str(dest) or not dest.is_dir() or summary.get("worker") != worker_key(cfg):
        return False
    return (summary["dest_fingerprint"] == tree_fingerprint(str(dest))["sha256"]
            and summary.get("source_fingerprint") == tree_fingerprint(source(cfg)))


def _clear_own_staging(dest: Path) -> None:
    """Remove a staging dir left by an earlier attempt of this stage (its marker names it); never anything else."""
    staging, marker = staging_dir(dest), staging_marker(dest)
    if staging.exists():
        if not marker.is_file():
            raise UserError(f"{staging} exists but this stage did not create it (no {marker.name}); "
                            "move it away to convert")
        shutil.rmtree(staging)
    marker.unlink(missing_ok=True)


def convert_once(cfg) -> dict:
    """Convert source -> destination unless it already holds this conversion; the summary either way."""
    dest = destination(cfg)
    src = source(cfg)
    source_print = tree_fingerprint(src)
    if source_print.get("missing"):
        raise UserError(f"{src}: the conversion's source does not exist (did the stage that writes it finish?)")
    if is_current(cfg):
        print(f"convert: {dest} already holds the conversion of {src} (OUT/summary.json); nothing to do", flush=True)
        return _summary(cfg)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} is not empty and is not this stage's conversion of {src} (no matching "
                        f"{out_dir(cfg) / 'summary.json'}): not converting over it; move it away, or set "
                        "megatron.convert_dest to an empty or new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clear_own_staging(dest)
    staging = staging_dir(dest)
    atomic_write_json(staging_marker(dest), {"stage_out": str(out_dir(cfg)), "host": socket.gethostname(),
                                             "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID")})
    command = build_command(cfg, staging)
    start = time.monotonic()
    print(f"convert ({cfg.megatron.convert_direction}): {src} -> {dest}\nrunning: {shlex.join(command)}", flush=True)
    result = subprocess.run(command)
    if result.returncode:
        raise UserError(f"conversion exited with {result.returncode} (command: {shlex.join(command)}); "
                        f"{dest} was left as it was")
    if not staging.is_dir() or not any(staging.iterdir()):
        raise UserError(f"the conversion exited 0 but wrote nothing to {staging} (command: {shlex.join(command)})")
    record = write_export_record(cfg, staging)
    dest_print = tree_fingerprint(str(staging))["sha256"]  # relative paths: the same after the rename
    if dest.is_dir():
        dest.rmdir()  # empty (checked above): nothing of the user's is in it
    staging.rename(dest)
    staging_marker(dest).unlink(missing_ok=True)
    summary = {"stage": cfg.stage, "metric": "converted", "value": 1.0, "wall_s": round(time.monotonic() - start, 1),
               "out": str(cfg.out), "direction": cfg.megatron.convert_direction, "source": src,
               "source_fingerprint": source_print, "dest": str(dest), "dest_fingerprint": dest_print,
               "worker": worker_key(cfg), "training_record": bool(record)}
    atomic_write_json(out_dir(cfg) / "summary.json", summary)
    print(f"convert: {src} -> {dest} in {summary['wall_s']:.0f} s", flush=True)
    return summary


def write_export_record(cfg, hf_dir: Path) -> dict | None:
    """An HF export of a training stage's checkpoints gets the record an HF-engine final/ has
    (hs3_training.json: the splits it was trained on, over its lineage, the data manifest, dtype and seq_len
    it was trained at, its inputs with content fingerprints; recipes.training.write_training_record), made from
    that stage's own config.yaml beside its checkpoints dir (RUN/STAGE/config.yaml for RUN/STAGE/checkpoints).
    The eval's held-out check, its lineage check and its load settings read it. A source that is not a stage
    of this project (no such config) gets no record, and says so."""
    if cfg.megatron.convert_direction == "hf_to_megatron":
        return None  # a Megatron checkpoint to start from, not a model anyone scores
    from recipes.training import STAGE_SPLITS, load_resolved_config, write_training_record

    stage_config = Path(source(cfg)).resolve().parent / "config.yaml"
    trained = load_resolved_config(stage_config) if stage_config.is_file() else None
    if trained is None or trained.stage not in STAGE_SPLITS:
        print(f"convert: no training record for {destination(cfg)}: the source is not the checkpoints of a training "
              f"stage of this project (no training stage's config.yaml at {stage_config})", flush=True)
        return None
    scoring = ({"reward_model": {"scoring": {"max_length": trained.train.seq_len, "dtype": trained.model.dtype}}}
               if trained.stage == "rl" else None)
    return write_training_record(hf_dir, trained, STAGE_SPLITS[trained.stage], inputs=scoring, engine="megatron",
                                 exported_from=source(cfg), export_direction=cfg.megatron.convert_direction)


def job_main(stage_config: str) -> int:
    """The SLURM job: the stage's rendered config, run here (executor=local), one writer at a time."""
    from omegaconf import OmegaConf

    from recipes import preemption
    from recipes.config import RunConfig

    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(stage_config))
    cfg.executor, cfg.dry_run = "local", False
    with preemption.OutputLock(cfg.out):
        convert_once(cfg)
    return 0


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


def step_policy(step: Path) -> dict:
    import yaml

    config_file = step / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{config_file}: no such file (a NeMo-RL checkpoint step holds its config)")
    return (yaml.safe_load(config_file.read_text()) or {}).get("policy") or {}


def converter_command(step: Path, dest: Path, converters: Path) -> list[str]:
    """NeMo-RL's converter for the step's backend (its config.yaml: policy.megatron_cfg.enabled)."""
    config_file = step / "config.yaml"
    policy = step_policy(step)
    weights = step / "policy" / "weights"
    if (policy.get("megatron_cfg") or {}).get("enabled"):
        iters = sorted((p for p in weights.glob("iter_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
        source_dir = iters[-1] if iters else weights
        return [MCORE_PYTHON, str(converters / "convert_megatron_to_hf.py"), "--config", str(config_file),
                "--megatron-ckpt-path", str(source_dir), "--hf-ckpt-path", str(dest)]
    return ["python", str(converters / "convert_dcp_to_hf.py"), "--config", str(config_file),
            "--dcp-ckpt-path", str(weights), "--hf-ckpt-path", str(dest)]


def write_reward_model_config(hf_dir: Path) -> dict:
    """A Bradley-Terry reward model exported by NeMo-RL gets its own config.json.

    NeMo-RL's DCP->HF converter writes the config of policy.model_name, the causal LM the reward model
    started from (native_checkpoint.py:266-269: AutoConfig.from_pretrained(model_name_or_path)), while the
    weights are those of the sequence classifier NeMo-RL trained with one output (dtensor_policy_worker.py:
    296-311 sets num_labels=1): loaded with that config the score head is [1, H] against an expected
    [num_labels=2, H] and transformers refuses it. Written here: the model type's ForSequenceClassification
    architecture, num_labels 1, and a pad id distinct from the end-of-turn token (the head reads the last
    non-pad token: recipes/reward.py), saved with the tokenizer so both agree."""
    from transformers import AutoConfig, AutoTokenizer

    from recipes.reward import ensure_distinct_pad

    config = AutoConfig.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    architectures = config.architectures or []
    causal = [a for a in architectures if a.endswith("ForCausalLM")]
    if not causal and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{hf_dir}: architectures {architectures} name no causal LM to derive the reward model's from")
    if causal:
        config.architectures = [causal[0][: -len("ForCausalLM")] + "ForSequenceClassification"]
    config.num_labels = 1
    ensure_distinct_pad(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return {"architectures": config.architectures, "num_labels": 1, "pad_token_id": config.pad_token_id}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a checkpoint (the convert stage's job), or export a NeMo-RL "
                                                 "checkpoint to an HF model dir (inside NeMo-RL's container)")
    parser.add_argument("--stage-config", help="OUT/config.yaml: run the convert stage once (its SLURM job)")
    parser.add_argument("--checkpoints", help="the NeMo-RL stage's checkpoint_dir (step_N/ inside)")
    parser.add_argument("--dest")
    parser.add_argument("--converters", help="NeMo-RL's examples/converters")
    parser.add_argument("--select", choices=("best", "latest"), default="latest")
    args = parser.parse_args(argv)
    if args.stage_config:
        return job_main(args.stage_config)
    if not (args.checkpoints and args.dest and args.converters):
        parser.error("--checkpoints, --dest and --converters are required without --stage-config")
    step = select_step(Path(args.checkpoints), args.select)
    command = converter_command(step, Path(args.dest), Path(args.converters))
    print(f"convert: {args.select} NeMo-RL checkpoint {step} -> {args.dest}\nrunning: {shlex.join(command)}", flush=True)
    code = subprocess.run(command).returncode
    if code == 0 and (step_policy(step).get("reward_model_cfg") or {}).get("enabled"):
        written = write_reward_model_config(Path(args.dest))
        print(f"convert: reward model config written to {args.dest}/config.json: {written}", flush=True)
    return code


if __name__ == "__main__":
    from hs3.io import cli_main

    sys.exit(cli_main(main)(sys.argv[1:]))
