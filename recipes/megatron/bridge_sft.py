"""sft on Megatron-Bridge: our stage config -> Megatron-Bridge's own ConfigContainer.

    ./launch.sh sft engine=megatron model=llama33_70b [--dry-run]

Starts from Megatron-Bridge's Llama-3.1-70B full-SFT recipe (cfg.megatron.megatron_bridge_recipe), with
model and tokenizer overridden to cfg.megatron.hf_model_id, and changes only what our stage config
decides: the chat SFT data (loss on the final assistant turn), lr / global batch / epochs -> train
iterations / sequence length, checkpoint and resume dirs, and the parallel plan.

Two halves:
  * here, without Megatron and without the data (a pipeline renders sft before its data job has run):
    `render(cfg)` writes OUT/megatron_bridge_sft.yaml (recipe name, dataset fields, where our sft rows
    are, and dotted overrides), and `build_command(cfg)` returns one rank's command; `--dry-run` prints
    both and stops.
  * in the container: `python -m recipes.megatron.bridge_sft --config OUT/megatron_bridge_sft.yaml`, on
    every rank. Before any torch.distributed call, rank 0 alone prepares the data: our sft rows ->
    OUT/dataset/{training,validation}.jsonl (the layout GPTSFTChatDataset reads) and, with packing,
    Megatron-Bridge's own packing step (GPTSFTDatasetBuilder.prepare_data, which its finetune would
    otherwise run on rank 0 while every other rank waits in a barrier under the 10-minute NCCL
    timeout: data/builders/gpt_sft.py:734-738 at 0.6.2); the other ranks wait for its marker file,
    outside any collective. Then every rank builds the recipe, applies the file with Megatron-Bridge's
    own override parser and calls `finetune`, whose packing step finds the packs and skips
    (gpt_sft.py:652-654). Only this half imports megatron.bridge.
Epochs: `train.num_epochs` (Megatron-Bridge 0.6.2, training/config.py:445): finetune sets train_iters
from the length of the built training dataset (data/loaders.py:186-195, config.py:1591-1599), which with
packing is the number of packs, so train.epochs=1 is one pass over the data, packed or not.
Preemption: Megatron-Bridge's finetune returns only when its training loop ran to train_iters (and saved
the last step: train.py:749-766); every exit condition (the exit signal: on SIGTERM it checkpoints; a
duration or iteration limit) ends in sys.exit(exit_code) instead (train.py:794-805). The wrapper catches
that SystemExit and exits PREEMPTED_EXIT_CODE when the saved iteration is short of the planned one, so the
job requeues and its dependents do not start. The saved iteration is read with Megatron-Bridge's own
read_train_state, whose lru_cache (checkpoint_utils.py:443) still holds the step this launch resumed from:
the cache is cleared first, as Megatron-Bridge does before an in-process restart (state.py:476-480).
Checkpoints kept: train.save_total_limit -> checkpoint.most_recent_k (Megatron's default -1 keeps every one,
~1.3 TB each at 70B with optimizer state). Logging: train.report_to -> logger.tensorboard_dir (tensorboard)
and logger.wandb_project (wandb: Megatron-Bridge's own W&B writer, state.py:197-221, which reads
WANDB_API_KEY from the environment; the SLURM batch script fills it from the login's `wandb login` entry).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

from recipes import preemption
from recipes.config import ConfigError, to_yaml
from recipes.curves import reporters, run_name, wandb_project
from hs3.io import UserError, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from recipes.megatron import megatron_decay_style
from recipes.megatron.plan import count_rows, plan_from_cfg, plan_nodes, validate_plan

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


IMPORT_DIR = Path("import") / "converted"  # the megatron pipeline's `import` entry writes run_dir/import/converted


def pretrained_checkpoint(cfg) -> str:
    """The Megatron checkpoint sft starts from: init, or the pipeline's HF -> Megatron import
    (run_dir/import/converted; by hand: ./launch.sh convert out=RUN_DIR/import)."""
    return str(Path(cfg.init).resolve()) if cfg.init else str((Path(cfg.run_dir) / IMPORT_DIR).resolve())


def sources(cfg) -> dict[str, str]:
    """Our sft rows, by split (read in the job, not at submission)."""
    return {split: str((Path(cfg.data_dir) / "sft" / f"{split}.jsonl").resolve()) for split in SPLIT_FILES}


def write_dataset(source_files: dict[str, str], root: Path) -> dict[str, int]:
    """Our sft/{train,validation}.jsonl -> Megatron-Bridge's chat layout under root; rows per split."""
    rows = {}
    for split, name in SPLIT_FILES.items():
        source = Path(source_files[split])
        if not source.is_file():
            raise UserError(f"{source}: no such file (run the data stage first: ./launch.sh data)")
        conversations = []
        for i, row in enumerate(read_jsonl(source)):
            messages = row.get("messages")
            if not messages or messages[-1].get("role") != "assistant":
                raise UserError(f"{source} line {i + 1}: `messages` must end with the assistant turn to train on")
            conversations.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
        rows[split] = atomic_write_jsonl(root / name, conversations)
    return rows


def train_iters(cfg, rows: int) -> int:
    """The plan's estimate (printed by `plan`, used by the local summary); the job itself counts
    iterations from the built dataset (train.num_epochs) unless train.max_steps is set."""
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


def logger_overrides(cfg) -> dict:
    """train.report_to -> Megatron-Bridge's LoggerConfig (megatron-core training_config.py:244-348): TensorBoard
    event files in OUT/tb_logs; W&B in project train.wandb_project as run train.run_name (as on engine=hf:
    recipes/curves.py), entity $WANDB_ENTITY, files under OUT/wandb. None: that logger off."""
    names = reporters(cfg.train.report_to)
    wandb = "wandb" in names
    return {
        "logger.tensorboard_dir": str(out_dir(cfg) / "tb_logs") if "tensorboard" in names else None,
        "logger.wandb_project": wandb_project(cfg) if wandb else None,
        "logger.wandb_entity": os.environ.get("WANDB_ENTITY") if wandb else None,
        "logger.wandb_exp_name": run_name(cfg) if wandb else None,
        "logger.wandb_save_dir": str(out_dir(cfg) / "wandb") if wandb else None,
    }


def bridge_config(cfg, rows: int) -> dict:
    """The document `render` writes: everything the in-container half needs, in Megatron-Bridge's names.
    rows: the plan's estimate of training rows, for the record only (the job counts the dataset)."""
    p, t = cfg.parallel, cfg.train
    by_steps = t.max_steps > 0
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
        # batch and schedule: train.max_steps iterations, else train.epochs passes over the built
        # (packed) dataset; warmup as a fraction and decay over all iterations (config.py:1622, 1647)
        "train.train_iters": t.max_steps if by_steps else None,
        "train.num_epochs": None if by_steps else t.epochs,
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
        "scheduler.lr_warmup_iters": 0,
        "scheduler.lr_warmup_fraction": t.warmup_ratio,
        "scheduler.lr_decay_iters": None,
        "scheduler.lr_decay_style": megatron_decay_style(t.lr_scheduler),
        "validation.eval_interval": t.eval_steps,
        # checkpoints: start from the converted base model, save here, resume from here
        "checkpoint.pretrained_checkpoint": pretrained_checkpoint(cfg),
        "checkpoint.save": str(out_dir(cfg) / "checkpoints"),
        "checkpoint.load": resume_dir(cfg),
        "checkpoint.save_interval": t.save_steps,
        # keep the latest train.save_total_limit (>= 1): Megatron's CheckpointConfig.most_recent_k, whose
        # default -1 keeps every checkpoint (megatron-core training_config.py:421); Megatron-Bridge removes
        # the older ones after each save (checkpointing.py:1584-1626)
        "checkpoint.most_recent_k": t.save_total_limit,
        "logger.log_interval": t.logging_steps,
        **logger_overrides(cfg),
        # SIGTERM (the SLURM batch script sends it on USR1, before the time limit): save a checkpoint, stop.
        "train.exit_signal_handler": True,
        # backstop for collectives that wait on one rank (the packing itself runs before any collective)
        "dist.distributed_timeout_minutes": cfg.megatron.distributed_timeout_minutes,
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
        "train_rows_estimate": rows,
        "train_iters": t.max_steps if by_steps else None,  # None: from train.num_epochs at run time
        "sources": sources(cfg),  # our sft rows, converted into dataset_root by rank 0 in the job
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


def render(cfg) -> dict[str, str]:
    """Write config.yaml, megatron_bridge_sft.yaml and command.sh into cfg.out. Reads no data: the job
    converts (and packs) it, so a pipeline can render sft before its data job has run."""
    validate_plan(plan_from_cfg(cfg))
    if not cfg.megatron.hf_model_id:
        raise ConfigError("megatron.hf_model_id is empty: the HF model whose config and tokenizer the recipe uses")
    rows, source = count_rows(cfg)
    document = bridge_config(cfg, rows)
    text = f"# Megatron-Bridge SFT config rendered by recipes.megatron.bridge_sft (train rows estimate: {source})\n"
    text += yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    files = {str(config_path(cfg)): text, str(out_dir(cfg) / "config.yaml"): to_yaml(cfg),
             str(out_dir(cfg) / "command.sh"): command_script(cfg)}
    for path, content in files.items():
        atomic_write_text(path, content)
    return files


def run(cfg) -> dict:
    """Render, then train on this node (a one-node plan); multi-node plans go through executor=slurm."""
    files = render(cfg)
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

    command = local_command(cfg)
    print("running:", shlex.join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode == preemption.PREEMPTED_EXIT_CODE:
        raise UserError(f"sft stopped at a checkpoint (exit {result.returncode}); rerun the same command to resume")
    if result.returncode:
        raise UserError(f"Megatron-Bridge sft exited with {result.returncode} (command: {shlex.join(command)})")
    summary_file = out_dir(cfg) / "summary.json"
    return json.loads(summary_file.read_text()) if summary_file.is_file() else {"stage": "sft", "out": cfg.out}


# ---- in the container ------------------------------------------------------------------------------

def launch_id() -> str:
    """Names this launch of the job (a requeued job is a new launch): SLURM job + restart, else torchrun's run."""
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return f"run-{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}-{os.environ.get('MASTER_PORT', '')}"


def prepared_marker(document: dict) -> Path:
    return Path(document["dataset"]["dataset_root"]) / ".prepared"


def prepare_data(document: dict, pack=None) -> dict[str, int]:
    """Rank 0, before any collective: our rows -> the dataset dir, then (packing) Megatron-Bridge's packing
    step, then the marker the other ranks wait for. `pack(document)` runs the packing (in the container:
    `pack_dataset`)."""
    marker = prepared_marker(document)
    marker.unlink(missing_ok=True)
    rows = write_dataset(document["sources"], Path(document["dataset"]["dataset_root"]))
    print(f"sft: {rows['train']} training / {rows['validation']} validation conversations -> "
          f"{document['dataset']['dataset_root']}", flush=True)
    if document["dataset"].get("enable_offline_packing"):
        start = time.monotonic()
        (pack or pack_dataset)(document)
        print(f"sft: packed once, before training, in {time.monotonic() - start:.0f} s", flush=True)
    atomic_write_json(marker, {"launch": launch_id(), "rows": rows})
    return rows


def wait_for_data(document: dict, poll_s: float = 5.0) -> None:
    """Ranks other than 0: wait (outside torch.distributed, so no NCCL timeout) for rank 0's marker of
    this launch. If rank 0 fails, srun --kill-on-bad-exit ends this task."""
    marker = prepared_marker(document)
    start, last_note = time.monotonic(), 0.0
    while True:
        try:
            if json.loads(marker.read_text()).get("launch") == launch_id():
                return
        except (OSError, ValueError):
            pass
        waited = time.monotonic() - start
        if waited - last_note >= 300 and os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"sft: waiting for rank 0 to prepare the data ({waited:.0f} s)", flush=True)
            last_note = waited
        time.sleep(poll_s)


def build_container(document: dict):
    """Megatron-Bridge's recipe with our dataset and overrides applied (imports megatron.bridge)."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.data.builders import ChatSFTPreprocessingConfig, GPTSFTDatasetConfig
    from megatron.bridge.data.packing import PackedSequenceSpecs
    from megatron.bridge.recipes import llama as llama_recipes
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
    return process_config_with_overrides(container, cli_overrides=document["overrides"])


def pack_dataset(document: dict) -> None:
    """Megatron-Bridge's packing step, as its standalone pre-packing script runs it
    (scripts/training/prepare_gpt_sft_packed_data.py: build_tokenizer, GPTSFTDatasetBuilder.prepare_data)."""
    from megatron.bridge.data.builders import GPTSFTDatasetBuilder
    from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer

    container = build_container(document)
    GPTSFTDatasetBuilder(config=container.dataset, tokenizer=build_tokenizer(container.tokenizer)).prepare_data()


def finetune_from_file(path: str, rank: int | None = None) -> int:
    """Prepare the data (rank 0) or wait for it, then train; returns the exit code (0, or
    PREEMPTED_EXIT_CODE when stopped at a checkpoint short of the planned iterations)."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank == 0:
        prepare_data(document)
    else:
        wait_for_data(document)
    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.gpt_step import forward_step

    container = build_container(document)
    start = time.monotonic()
    stopped = False
    try:
        finetune(config=container, forward_step_func=forward_step)
    except SystemExit as exc:  # exit signal / duration / iteration exit: train.py:794-805 calls sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0:
            raise
        stopped = True
    # train_iters: ours with train.max_steps, else the one finetune derived from train.num_epochs
    return finish(document, document.get("train_iters") or container.train.train_iters, start, rank, stopped)


def finish(document: dict, planned_iters: int | None, start: float, rank: int, stopped: bool) -> int:
    """After finetune. It returned (stopped=False): the loop ran to train_iters, summary.json, exit 0. It
    exited (stopped=True): a saved iteration short of the plan means it stopped at a checkpoint
    (preempted): exit PREEMPTED_EXIT_CODE so the job requeues; else it had finished, as above."""
    out = Path(document["out"])
    saved = saved_iteration(str(out / "checkpoints")) if stopped else None
    if stopped and (planned_iters is None or saved < planned_iters):
        if rank == 0:
            atomic_write_json(out / preemption.PREEMPTED_MARKER_FILE, {"step": saved})
            print(f"sft: stopped at iteration {saved} of {planned_iters} with a checkpoint; exit "
                  f"{preemption.PREEMPTED_EXIT_CODE} (requeue or rerun to resume)", flush=True)
        return preemption.PREEMPTED_EXIT_CODE
    if rank == 0:
        summary = {"stage": "sft", "metric": "train_iters", "value": planned_iters,
                   "wall_s": round(time.monotonic() - start, 1), "out": str(out), "checkpoints": str(out / "checkpoints")}
        atomic_write_json(out / "summary.json", summary)
        print(f"sft: finetune completed (train_iters {planned_iters}) in {time.monotonic() - start:.0f} s -> {out}/checkpoints")
    return 0


def saved_iteration(save_dir: str) -> int:
    """The iteration of the latest checkpoint Megatron-Bridge saved in save_dir (-1: none yet). Its
    read_train_state is an lru_cache keyed by the file name (checkpoint_utils.py:443): this launch's resume
    cached the step it started from, and every save since rewrote that same file, so the cache is
    cleared first (as Megatron-Bridge's own reset_for_restart does, state.py:476-480)."""
    from megatron.bridge.training.utils.checkpoint_utils import (
        TRACKER_PREFIX, get_checkpoint_train_state_filename, read_train_state)

    tracker = get_checkpoint_train_state_filename(save_dir, prefix=TRACKER_PREFIX)
    if not Path(tracker).exists():
        return -1
    read_train_state.cache_clear()
    return read_train_state(tracker).step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a rendered Megatron-Bridge SFT config (inside the container)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return finetune_from_file(args.config)


if __name__ == "__main__":
    from hs3.io import cli_main

    sys.exit(cli_main(main)(sys.argv[1:]))
