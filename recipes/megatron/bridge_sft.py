"""sft on Megatron-Bridge: our stage config -> Megatron-Bridge's own ConfigContainer.

    ./launch.sh sft engine=megatron model=llama33_70b [--dry-run]

Starts from Megatron-Bridge's Llama-3.1-70B full-SFT recipe (cfg.megatron.megatron_bridge_recipe), with
model and tokenizer overridden to cfg.megatron.hf_model_id, and changes only what our stage config
decides: the chat SFT data (loss on the final assistant turn), lr / global batch / epochs -> train
iterations / sequence length, checkpoint and resume dirs, and the parallel plan.

Two halves:
  * here, without Megatron: `render(cfg)` writes OUT/dataset/{training,validation}.jsonl (the layout
    Megatron-Bridge's GPTSFTChatDataset reads: {"messages": [...]} per line) and
    OUT/megatron_bridge_sft.yaml (recipe name, dataset fields, and dotted overrides), and
    `build_command(cfg)` returns the torchrun line; `--dry-run` prints both and stops.
  * in NVIDIA's container: `python -m recipes.megatron.bridge_sft --config OUT/megatron_bridge_sft.yaml`
    builds the recipe, applies the file with Megatron-Bridge's own override parser and calls its
    `finetune`. Only this half imports megatron.bridge.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

from recipes import preemption
from recipes.config import ConfigError, to_yaml
from recipes.io import UserError, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from recipes.megatron import megatron_decay_style
from recipes.megatron.plan import count_rows, plan_from_cfg, plan_nodes, validate_plan
from recipes.training import write_summary

CONFIG_NAME = "megatron_bridge_sft.yaml"
# Megatron-Bridge's GPTSFTDatasetConfig reads DATASET_ROOT/training.jsonl and validation.jsonl.
SPLIT_FILES = {"train": "training.jsonl", "validation": "validation.jsonl"}


def out_dir(cfg) -> Path:
    """Absolute: the command runs inside a container, possibly from another working directory."""
    return Path(cfg.out).resolve()


def dataset_root(cfg) -> Path:
    return out_dir(cfg) / "dataset"


def config_path(cfg) -> Path:
    return out_dir(cfg) / CONFIG_NAME


def pretrained_checkpoint(cfg) -> str:
    """The Megatron checkpoint sft starts from: init, or the convert stage's hf_to_megatron output."""
    return str(Path(cfg.init).resolve()) if cfg.init else str((Path(cfg.run_dir) / "convert").resolve())


def write_dataset(cfg) -> dict[str, int]:
    """Our sft/{train,validation}.jsonl -> Megatron-Bridge's chat layout; returns rows per split."""
    rows = {}
    for split, name in SPLIT_FILES.items():
        source = Path(cfg.data_dir) / "sft" / f"{split}.jsonl"
        if not source.is_file():
            raise UserError(f"{source}: no such file (run the data stage first: ./launch.sh data)")
        conversations = []
        for i, row in enumerate(read_jsonl(source)):
            messages = row.get("messages")
            if not messages or messages[-1].get("role") != "assistant":
                raise UserError(f"{source} line {i + 1}: `messages` must end with the assistant turn to train on")
            conversations.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
        rows[split] = atomic_write_jsonl(dataset_root(cfg) / name, conversations)
    return rows


def train_iters(cfg, rows: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(rows * cfg.train.epochs / cfg.train.global_batch))


def resume_dir(cfg) -> str | None:
    """Where Megatron-Bridge loads from to resume: its own save dir unless resume=never / a path."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return str(out_dir(cfg) / "checkpoints")
    return str(cfg.resume)


def bridge_config(cfg, rows: int) -> dict:
    """The document `render` writes: everything the in-container half needs, in Megatron-Bridge's names."""
    p, t = cfg.parallel, cfg.train
    iters = train_iters(cfg, rows)
    warmup = int(round(t.warmup_ratio * iters))
    overrides = {
        # parallel plan (GPTModelProvider / TransformerConfig fields)
        "model.tensor_model_parallel_size": p.tp,
        "model.pipeline_model_parallel_size": p.pp,
        "model.virtual_pipeline_model_parallel_size": p.vpp,
        "model.context_parallel_size": p.cp,
        "model.sequence_parallel": p.sequence_parallel,
        "model.seq_length": t.seq_len,
        "model.recompute_granularity": "full" if p.recompute else None,
        "model.recompute_method": "uniform" if p.recompute else None,
        "model.recompute_num_layers": 1 if p.recompute else None,
        # batch and schedule
        "train.train_iters": iters,
        "train.global_batch_size": t.global_batch,
        "train.micro_batch_size": t.micro_batch,
        "optimizer.lr": t.lr,
        "optimizer.min_lr": t.lr * t.min_lr_ratio,
        "optimizer.weight_decay": t.weight_decay,
        "optimizer.use_distributed_optimizer": p.distributed_optimizer,
        "ddp.use_distributed_optimizer": p.distributed_optimizer,
        # The scheduler (override_opt_param_scheduler=True in the recipe) sets the weight decay each step.
        "scheduler.start_weight_decay": t.weight_decay,
        "scheduler.end_weight_decay": t.weight_decay,
        "scheduler.lr_warmup_iters": warmup,
        "scheduler.lr_decay_iters": iters,
        "scheduler.lr_decay_style": megatron_decay_style(t.lr_scheduler),
        "validation.eval_interval": t.eval_steps,
        # checkpoints: start from the converted base model, save here, resume from here
        "checkpoint.pretrained_checkpoint": pretrained_checkpoint(cfg),
        "checkpoint.save": str(out_dir(cfg) / "checkpoints"),
        "checkpoint.load": resume_dir(cfg),
        "checkpoint.save_interval": t.save_steps,
        "logger.log_interval": t.logging_steps,
        "logger.tensorboard_dir": str(out_dir(cfg) / "tb_logs"),
        # SIGTERM (the SLURM batch script sends it on USR1, before the time limit): save a checkpoint, stop.
        "train.exit_signal_handler": True,
        "rng.seed": cfg.seed,
        "tokenizer.tokenizer_model": cfg.megatron.hf_model_id,
    }
    dataset = {
        "dataset_root": str(dataset_root(cfg)),
        "seq_length": t.seq_len,
        "preprocessing": {"loss_mode": "last_turn"},  # loss on the final assistant turn only
        "do_validation": True,
        "do_test": False,
        "enable_offline_packing": t.packing,
        "seed": cfg.seed,
    }
    if t.packing:  # as the recipe's own packed default: pack to seq_length, pad each row to 2*CP with CP
        dataset["offline_packing_specs"] = {"packed_sequence_size": t.seq_len, "pad_seq_to_mult": 2 * p.cp if p.cp > 1 else 1}
        dataset["dataset_kwargs"] = {"pad_to_max_length": True}
    return {
        "megatron_bridge": {
            "version": cfg.megatron.megatron_bridge_version,
            "commit": cfg.megatron.megatron_bridge_commit,
            "container": cfg.megatron.container,
        },
        "recipe": cfg.megatron.megatron_bridge_recipe,
        # The recipe reads its model config from this HF model (instead of Meta-Llama-3.1-70B).
        "hf_model_id": cfg.megatron.hf_model_id,
        # GPTSFTDatasetConfig fields; preprocessing = ChatSFTPreprocessingConfig(loss_mode=...).
        # GPTSFTDatasetConfig fields; preprocessing = ChatSFTPreprocessingConfig(loss_mode=...),
        # offline_packing_specs = PackedSequenceSpecs(...).
        "dataset": dataset,
        "train_rows": rows,
        "out": str(out_dir(cfg)),  # summary.json goes here when training ends
        "overrides": [f"{key}={_override_value(value)}" for key, value in overrides.items()],
    }


def _override_value(value) -> str:
    """Hydra-style override values, as Megatron-Bridge's process_config_with_overrides parses them."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_command(cfg) -> list[str]:
    """One rank's command (inside the container, from the repository root). The SLURM job starts one per
    GPU with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set; see `local_command` for one node."""
    return ["python", "-m", "recipes.megatron.bridge_sft", "--config", str(config_path(cfg))]


def local_command(cfg) -> list[str]:
    """All ranks of a one-node plan on this machine, through torchrun."""
    _, gpus = plan_nodes(cfg)
    return ["torchrun", "--standalone", f"--nproc-per-node={gpus}", *build_command(cfg)[1:]]


def command_script(cfg) -> str:
    nodes, gpus = plan_nodes(cfg)
    return ("#!/usr/bin/env bash\n# inside the container, from the repository root\nset -euo pipefail\n"
            f"# {nodes} node(s) x {gpus} GPUs: one process per GPU with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,\n"
            "# MASTER_PORT set (the SLURM executor does this); on one node: " + shlex.join(local_command(cfg)) + "\n"
            + shlex.join(build_command(cfg)) + "\n")


def render(cfg, write_data: bool = True) -> dict[str, str]:
    """Write the dataset (when the sft data exists), config.yaml and megatron_bridge_sft.yaml into cfg.out."""
    validate_plan(plan_from_cfg(cfg))
    if not cfg.megatron.hf_model_id:
        raise ConfigError("megatron.hf_model_id is empty: the HF model whose config and tokenizer the recipe uses")
    if write_data and (Path(cfg.data_dir) / "sft" / "train.jsonl").is_file():
        rows = write_dataset(cfg)["train"]
        source = f"{rows} rows converted into {dataset_root(cfg)}"
    else:
        rows, source = count_rows(cfg)
    document = bridge_config(cfg, rows)
    text = f"# Megatron-Bridge SFT config rendered by recipes.megatron.bridge_sft (train rows: {source})\n"
    text += yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    files = {str(config_path(cfg)): text, str(out_dir(cfg) / "config.yaml"): to_yaml(cfg),
             str(out_dir(cfg) / "command.sh"): command_script(cfg)}
    for path, content in files.items():
        atomic_write_text(path, content)
    return files


def run(cfg) -> dict:
    """Render, then train on this node (a one-node plan); multi-node plans go through executor=slurm."""
    files = render(cfg, write_data=not cfg.dry_run or (Path(cfg.data_dir) / "sft" / "train.jsonl").is_file())
    nodes, _ = plan_nodes(cfg)
    if cfg.dry_run:
        print(files[str(config_path(cfg))], end="")
        print("command (one per GPU):", shlex.join(build_command(cfg)))
        if nodes == 1:
            print("command (this node):", shlex.join(local_command(cfg)))
        print(f"sft (megatron, dry run): wrote {config_path(cfg)} and command.sh; nothing was run")
        return {"stage": "sft", "metric": "dry_run", "value": 0, "out": cfg.out}
    if nodes > 1:
        raise UserError(f"the sft plan needs {nodes} nodes: submit it with executor=slurm cluster=NAME (a local run uses one node)")
    import subprocess

    start = time.monotonic()
    command = local_command(cfg)
    print("running:", shlex.join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode:
        raise UserError(f"Megatron-Bridge sft exited with {result.returncode} (command: {shlex.join(command)})")
    return write_summary(cfg, "train_iters", float(train_iters(cfg, count_rows(cfg)[0])), start,
                         checkpoints=str(out_dir(cfg) / "checkpoints"))


# ---- in the container ------------------------------------------------------------------------------

def finetune_from_file(path: str) -> None:
    """Build Megatron-Bridge's recipe, apply the rendered file, and train (imports megatron.bridge)."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    from megatron.bridge import AutoBridge
    from megatron.bridge.data.builders import ChatSFTPreprocessingConfig, GPTSFTDatasetConfig
    from megatron.bridge.data.packing import PackedSequenceSpecs
    from megatron.bridge.recipes import llama as llama_recipes
    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    recipe = getattr(llama_recipes, document["recipe"])
    hf_model_id = document["hf_model_id"]
    # The recipe builds its model config with AutoBridge.from_hf_pretrained("meta-llama/Meta-Llama-3.1-70B");
    # point that one call at our model (same architecture) so config and tokenizer are Llama-3.3's.
    original = AutoBridge.__dict__["from_hf_pretrained"]
    AutoBridge.from_hf_pretrained = classmethod(lambda cls, _path, **kw: original.__func__(cls, hf_model_id, **kw))
    try:
        container = recipe()
    finally:
        AutoBridge.from_hf_pretrained = original
    dataset = dict(document["dataset"])
    dataset["preprocessing"] = ChatSFTPreprocessingConfig(**dataset["preprocessing"])
    if dataset.get("offline_packing_specs"):
        dataset["offline_packing_specs"] = PackedSequenceSpecs(**dataset["offline_packing_specs"])
    container.dataset = GPTSFTDatasetConfig(**dataset, dataloader_type="batch")
    container = process_config_with_overrides(container, cli_overrides=document["overrides"])
    start = time.monotonic()
    finetune(config=container, forward_step_func=forward_step)
    iters = next(int(o.split("=", 1)[1]) for o in document["overrides"] if o.startswith("train.train_iters="))
    saved = saved_iteration(str(Path(document["out"]) / "checkpoints"))
    if saved < iters:  # stopped by the exit signal handler: the checkpoint is saved, the job requeues
        if os.environ.get("RANK", "0") == "0":
            atomic_write_json(Path(document["out"]) / preemption.PREEMPTED_MARKER_FILE, {"step": saved})
            print(f"sft: stopped at iteration {saved} of {iters} with a checkpoint; exit {preemption.PREEMPTED_EXIT_CODE} "
                  "(requeue or rerun to resume)", flush=True)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)
    if os.environ.get("RANK", "0") == "0":
        summary = {"stage": "sft", "metric": "train_iters", "value": iters, "wall_s": round(time.monotonic() - start, 1),
                   "out": document["out"], "checkpoints": str(Path(document["out"]) / "checkpoints")}
        atomic_write_json(Path(document["out"]) / "summary.json", summary)
        print(f"sft: {iters} iterations in {time.monotonic() - start:.0f} s -> {document['out']}/checkpoints")


def saved_iteration(save_dir: str) -> int:
    """The iteration of the latest checkpoint Megatron-Bridge saved in save_dir (-1: none yet)."""
    from megatron.bridge.training.utils.checkpoint_utils import (
        TRACKER_PREFIX, get_checkpoint_train_state_filename, read_train_state)

    tracker = get_checkpoint_train_state_filename(save_dir, prefix=TRACKER_PREFIX)
    return read_train_state(tracker).step if Path(tracker).exists() else -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a rendered Megatron-Bridge SFT config (inside NVIDIA's container)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    finetune_from_file(args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
