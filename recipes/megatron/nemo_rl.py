"""rm / rl / dpo on NeMo-RL: our stage config -> a NeMo-RL YAML in its own schema, run by its entry points.

    ./launch.sh rm  engine=megatron model=llama33_70b [--dry-run]   -> examples/run_rm.py   (Bradley-Terry)
    ./launch.sh rl  engine=megatron model=llama33_70b [--dry-run]   -> examples/run_grpo.py (RLOO)
    ./launch.sh dpo engine=megatron model=llama33_70b [--dry-run]   -> examples/run_dpo.py

Each rendered YAML starts with `defaults: NEMO_RL_DIR/examples/configs/<example>.yaml` (NeMo-RL's own
config inheritance, nemo_rl/utils/config.py) and sets every key our stage config decides; the rest keeps
the value NeMo-RL ships at the pinned commit. tests/test_nemo_rl_upstream.py loads each rendered YAML with
NeMo-RL's own loader over its own examples and checks that every key we set exists upstream and resolves
to what we mean (file:line below are NeMo-RL v0.7.0, 81aa43d):
  rm  <- rm.yaml: Bradley-Terry on the DTensor (FSDP2) backend, v1 worker (NeMo-RL has no Megatron reward
         models). Plan: FSDP over all GPUs without tensor parallelism (conf/model/llama33_70b.yaml). The v1
         worker (dtensor_cfg._v2 false, lm_policy.py:134-160) shards with _parallelize_model
         (dtensor_policy_worker.py:407), which has no optimised TP plan for LlamaForSequenceClassification
         (parallelize.py:328-338); TP > 1 falls back to the HF plan the installed transformers attaches to
         the model, which refuses sequence parallelism (parallelize.py:700-717) and whose style names must be
         ones NeMo-RL translates (parallelize.py:342-364: transformers 5.25's "embedding_rowwise" is not).
         TP 1 takes none of those paths (parallelize.py:664). `plan` refuses sequence parallelism with TP > 1
         for rm. The v2 worker (nemo_automodel) is not pinned here, so nothing here could check it.
         Validation = the held-out slice of edit_quality/train the HF engine selects on (recipes/rm.py
         train_and_selection); edit_quality/validation never reaches NeMo-RL. Cadence: recipes/rm.py
         evaluation_cadence (at least rm.min_evaluations evaluations), val_at_end on, a checkpoint at each
         evaluation, best = lowest val:validation-default_loss (rm.py:545-640).
  rl  <- grpo_math_70B_megatron.yaml: GRPO with use_leave_one_out_baseline=true and normalize_rewards=false
         (= RLOO), reward from our rm checkpoint through NeMo-RL's reward-model environment, KL penalty
         rl.kl_coef, k generations per prompt, vLLM, Megatron policy. As on engine=hf: prompts longer than
         train.seq_len - rl.max_new_tokens are skipped and counted (recipes/rl.py's rule and token count),
         rl.mask_truncated_completions is grpo.overlong_filtering (cut completions out of the loss,
         grpo.py:2525-2534; unlike TRL, NeMo-RL still counts their reward in their siblings' leave-one-out
         baseline, grpo.py:2460-2469), and no validation (engine=hf's rl evaluates nothing; the eval split
         chooses nothing).
  dpo <- dpo.yaml, with a Megatron policy; max_num_steps/epochs, validation (pairs/validation, as engine=hf's
         DPOTrainer) and its cadence set here (dpo.yaml's max_num_steps 150 and val_at_start true are not ours).
Data is handed over in the formats their loaders read: pairs -> PreferenceDataset rows
({"context", "completions": [{"rank", "completion"}]}); RL prompts -> ResponseDataset rows with a
`messages` column. RL prompts are multi-turn conversations, which none of NeMo-RL's built-in
processors renders (math_hf_data_processor keeps only the first user turn), so rl registers one
processor, `hs3_edit_prompt`, with NeMo-RL's register_processor: one message per turn, each with its
raw text, as the reward model saw conversations in rm training.

Tokenizer: every stage uses the model's own chat template (policy.tokenizer.chat_template "default";
rm.yaml ships another, without the date line) as engine=hf and the eval do. rm is handed a copy of the
tokenizer with a pad token distinct from <|eot_id|> (recipes.reward.ensure_distinct_pad): NeMo-RL sets
pad = eos when there is none (algorithms/utils.py get_tokenizer), and a sequence classifier reads its
score at the last non-pad token, so with pad = <|eot_id|> it would be trained to score one token earlier
than engine=hf, rl's reward and the eval read it.

HF->Megatron conversion cache (rl, dpo): NeMo-RL converts a Megatron policy's HF checkpoint once and keys
the cache by the model's path ($HF_HOME/nemo_rl/model_<path>, models/megatron/setup.py:445-460); a
rebuilt sft/final at the same path would train the stale model. The job hands NeMo-RL the source through
OUT/policy_source/<content fingerprint> (a link to it; recipes.provenance.model_fingerprint), so the
cache key changes exactly when the weights do.

Logging: train.report_to -> logger.tensorboard_enabled / wandb_enabled; W&B project train.wandb_project and
run name train.run_name, as on engine=hf (recipes/curves.py: null = $WANDB_PROJECT or helpsteer3-edit, and
RUN_DIR-ENTRY); entity WANDB_ENTITY, read by wandb itself; credentials from the user's `wandb login` or
WANDB_API_KEY, never written anywhere by us.

Every stage runs as `python -m recipes.megatron.nemo_rl --stage-config OUT/config.yaml --entry ENTRY
--config OUT/nemo_rl_STAGE.yaml` on the Ray head node. Submission renders the files without reading any
data (a pipeline submits rm before its data job has run); the wrapper, in the job, writes the data
hand-over, re-renders the NeMo-RL YAML with the real row counts, then runs NeMo-RL's entry point
in-process. Stopping early: NeMo-RL saves and returns when its TimeoutChecker says so
(checkpointing.checkpoint_must_save_by, set from the SLURM time limit less the start-up allowance,
setup_seconds; rm.py:585,702-704 and grpo.py:2880); the wrapper also lets the batch script's USR1 request
file trigger that same save, and then exits PREEMPTED_EXIT_CODE so SLURM requeues the job and it resumes
from the checkpoint (NeMo-RL resumes from its checkpoint_dir by itself) instead of ending COMPLETED with a
partial model.

kl_coef: on the HF engine (TRL's RLOO) rl.kl_coef is a per-token KL penalty subtracted from the reward;
with the GRPO/RLOO advantage estimator NeMo-RL has no reward-side KL (its use_kl_in_reward works only
with the reinforce_plus_plus estimator, advantage_estimator.py:158-220): rl.kl_coef becomes
loss_fn.reference_policy_kl_penalty, the weight of a KL estimate (reference_policy_kl_type: k3 in
grpo_math_1B.yaml:56-59) added to the policy loss (algorithms/loss/loss_functions.py:126,225). Same knob,
same direction, not the same objective: a value tuned on one engine is a starting point on the other.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import shlex
import sys
import time
from pathlib import Path

import yaml

from recipes import preemption
from recipes.config import ConfigError, to_yaml
from hs3.io import UserError, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from recipes.megatron import job_nodes, megatron_decay_style, slurm_time_seconds
from recipes.megatron.plan import parameter_counts, plan_from_cfg, validate_plan

EXAMPLE_CONFIG = {"rm": "rm.yaml", "rl": "grpo_math_70B_megatron.yaml", "dpo": "dpo.yaml"}
ENTRY_POINT = {"rm": "examples/run_rm.py", "rl": "examples/run_grpo.py", "dpo": "examples/run_dpo.py"}
SECTION = {"rm": "rm", "rl": "grpo", "dpo": "dpo"}  # NeMo-RL's algorithm section per stage
EDIT_PROCESSOR = "hs3_edit_prompt"
# NeMo-RL names the validation set of data.validation "default" (data/utils.py setup_preference_data):
# its loss is this metric (rm.py:304-311; dpo alike), the one rm's best checkpoint is chosen by.
VALIDATION_METRIC = "val:validation-default_loss"

# Start-up allowance before NeMo-RL's first iteration (its TimeoutChecker starts there), out of the SLURM
# time limit, when megatron.setup_minutes is null. Assumptions, not measurements (put your measured figure
# in megatron.setup_minutes): a fixed part for Ray, process groups, CUDA/NCCL and the vLLM engine (CUDA
# graphs), and every bf16 copy of the weights the stage reads or writes moved at SETUP_IO_BYTES_PER_S.
# Copies per launch: rm 1 (the HF model); dpo 2 (policy, reference); rl 4 (policy, reference, vLLM's HF
# load, the reward model); + 2 for the HF->Megatron conversion of a Megatron policy (read HF, write
# Megatron), counted on every launch because a requeued job cannot know beforehand whether the first one
# finished it. 70B: rm ~20 min, dpo ~34 min, rl ~43 min (setup_minutes 20 ended a first rl launch in
# TIMEOUT, which SLURM does not requeue; an allowance that is too long only shortens each job's training).
SETUP_FIXED_S = 15 * 60
SETUP_IO_BYTES_PER_S = 0.5e9
WEIGHT_COPIES = {"rm": 1, "dpo": 2, "rl": 4}
CONVERSION_COPIES = 2


def out_dir(cfg) -> Path:
    return Path(cfg.out).resolve()


def config_path(cfg) -> Path:
    return out_dir(cfg) / f"nemo_rl_{cfg.stage}.yaml"


def data_path(cfg, split: str) -> Path:
    return out_dir(cfg) / "data" / f"{split}.jsonl"


def tokenizer_dir(cfg) -> Path:
    """rm's tokenizer hand-over: the init model's tokenizer with a pad distinct from end of turn."""
    return out_dir(cfg) / "tokenizer"


# ---- data hand-over --------------------------------------------------------------------------------

def _messages(value, source: Path, line: int, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise UserError(f"{source} line {line}: `{key}` must be a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def preference_row(row: dict, source: Path, line: int) -> dict:
    """Our TRL-style pair -> NeMo-RL PreferenceDataset row (rank 0 is preferred)."""
    return {
        "context": _messages(row.get("prompt"), source, line, "prompt"),
        "completions": [
            {"rank": 0, "completion": _messages(row.get("chosen"), source, line, "chosen")},
            {"rank": 1, "completion": _messages(row.get("rejected"), source, line, "rejected")},
        ],
    }


def prompt_row(row: dict, source: Path, line: int) -> dict:
    """Our RL prompt -> a ResponseDataset row with `messages` (the conversation up to the edit request)."""
    messages = _messages(row.get("prompt"), source, line, "prompt")
    if messages[-1]["role"] != "user":
        raise UserError(f"{source} line {line}: an RL prompt must end with the user's edit request")
    return {"messages": messages, "reference_edit": row.get("reference_edit", "")}


def _source(cfg, relative: str) -> Path:
    path = Path(cfg.data_dir) / relative
    if not path.is_file():
        raise UserError(f"{path}: no such file (run the data stage first: ./launch.sh data)")
    return path


def _write_preferences(cfg, split: str, rows, source: Path) -> int:
    return atomic_write_jsonl(data_path(cfg, split), [preference_row(r, source, i + 1) for i, r in enumerate(rows)])


def write_data(cfg, tokenizer) -> dict:
    """The data hand-over for cfg.stage, with engine=hf's length and selection rules (tokens counted with
    `tokenizer`, the init model's, as engine=hf counts them). Returns the counts for the YAML and summary:
    {"train": rows NeMo-RL trains on, "validation": rows it validates on (0: none), ...}."""
    from recipes import training

    if cfg.stage == "rm":
        from recipes import rm

        train, selection, skipped, record = rm.train_and_selection(cfg, tokenizer)
        source = _source(cfg, "pairs/train.jsonl")
        counts = {"train": _write_preferences(cfg, "train", list(train), source), "validation": 0,
                  "skipped_too_long": {"train": skipped}, "selection": record}
        if len(selection):
            counts["validation"] = _write_preferences(cfg, "validation", list(selection), source)
        else:  # rm.selection_fraction=0 (keep_best off): NeMo-RL validates on nothing
            data_path(cfg, "validation").unlink(missing_ok=True)
        return counts
    if cfg.stage == "dpo":
        counts = {}
        for split in ("train", "validation"):
            source = _source(cfg, f"pairs/{split}.jsonl")
            counts[split] = _write_preferences(cfg, split, read_jsonl(source), source)
        return counts
    from recipes.rl import prompt_limit
    from recipes.rm import load_split

    source = _source(cfg, "prompts/train.jsonl")
    rows = [prompt_row(row, source, i + 1) for i, row in enumerate(read_jsonl(source))]  # checked first
    prompts = load_split(source)  # as recipes/rl.py loads and counts them
    lengths = training.token_lengths(tokenizer, list(prompts["prompt"]), add_generation_prompt=True)
    kept, skipped = training.skip_too_long(cfg, prompts, lengths, prompt_limit(cfg), "prompts/train")
    if len(kept) == 0:
        raise UserError(f"rl: every prompt is longer than train.seq_len - rl.max_new_tokens = {prompt_limit(cfg)} tokens")
    limit = prompt_limit(cfg)
    data_path(cfg, "validation").unlink(missing_ok=True)  # rl validates on nothing (a stale file would mislead)
    rows = [row for row, n in zip(rows, lengths) if n <= limit]
    return {"train": atomic_write_jsonl(data_path(cfg, "train"), rows), "validation": 0,
            "skipped_too_long": {"train": skipped}, "prompt_limit": limit}


# ---- config ----------------------------------------------------------------------------------------

def _model_location(cfg, value: str) -> str:
    """Local checkpoints become absolute paths (the driver may run elsewhere); hub ids stay as they are."""
    path = Path(str(value))
    if path.exists() or str(value).startswith(str(cfg.run_dir)):
        return str(path.resolve())
    return str(value)


def _policy_source(cfg) -> str:
    """The HF checkpoint the stage trains: init (sft output for rl/dpo) or the base model."""
    return _model_location(cfg, cfg.init if cfg.init else cfg.model.path)


def policy_source_link(cfg) -> str:
    """In the job (rl, dpo: Megatron policies): OUT/policy_source/<fingerprint>, a link to the policy's HF
    checkpoint named by its content, so that NeMo-RL's conversion cache, keyed by that path, is keyed by
    the weights (module docstring). A hub id or a missing dir stays as it is."""
    from recipes.provenance import model_fingerprint

    source = _policy_source(cfg)
    fingerprint = model_fingerprint(source) if Path(source).is_dir() else None
    if not fingerprint:
        return source
    link = out_dir(cfg) / "policy_source" / fingerprint[:16]
    if not (link.is_symlink() and os.readlink(link) == source):
        link.parent.mkdir(parents=True, exist_ok=True)
        temporary = link.with_name(f".{link.name}.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(source, target_is_directory=True)
        os.replace(temporary, link)
    return str(link)


def _megatron_policy(cfg) -> dict:
    p = cfg.parallel
    return {
        "enabled": True,
        "tensor_model_parallel_size": p.tp,
        "pipeline_model_parallel_size": p.pp,
        "context_parallel_size": p.cp,
        "sequence_parallel": p.sequence_parallel,
        "activation_checkpointing": p.recompute,
        "optimizer": {"lr": cfg.train.lr, "min_lr": cfg.train.lr * cfg.train.min_lr_ratio,
                      "weight_decay": cfg.train.weight_decay, "use_distributed_optimizer": p.distributed_optimizer},
        "scheduler": {"lr_decay_style": megatron_decay_style(cfg.train.lr_scheduler)},
    }


def _megatron_schedule(cfg, steps: int) -> dict:
    """Warmup and decay iterations of the Megatron policy's scheduler (keys of examples/configs/rm.yaml:124-131)."""
    return {"lr_decay_style": megatron_decay_style(cfg.train.lr_scheduler),
            "lr_warmup_iters": int(round(cfg.train.warmup_ratio * steps)), "lr_decay_iters": steps}


def steps_per_epoch(cfg, rows: int) -> int:
    """Full batches per epoch (NeMo-RL's train dataloaders drop the last partial batch: rm.py:179,
    dpo.py:207, grpo.py:363); rl batches prompts (each yields rl.k sequences of the global batch)."""
    return max(rows // (cfg.rl.prompts_per_step if cfg.stage == "rl" else cfg.train.global_batch), 1)


def planned_steps(cfg, rows: int) -> int:
    """Optimizer steps NeMo-RL takes: train.max_steps, or train.epochs (fractions too) of full batches."""
    t = cfg.train
    return t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * steps_per_epoch(cfg, rows)))


def torch_scheduler(cfg, steps: int) -> list[dict] | dict:
    """train.lr_scheduler + warmup_ratio -> the DTensor policy's `scheduler`: torch LR schedulers, chained
    by SequentialLR at `milestones` (dtensor_policy_worker.py:470-493 at v0.7.0; the list form of
    examples/configs/dpo.yaml:112-122). Warmup: LinearLR from ~0 over round(warmup_ratio x steps)."""
    t = cfg.train
    warmup = int(round(t.warmup_ratio * steps))
    rest = max(steps - warmup, 1)
    decay = {
        "cosine": {"name": "torch.optim.lr_scheduler.CosineAnnealingLR", "kwargs": {"T_max": rest, "eta_min": t.lr * t.min_lr_ratio}},
        "linear": {"name": "torch.optim.lr_scheduler.LinearLR",
                   "kwargs": {"start_factor": 1.0, "end_factor": max(t.min_lr_ratio, 1e-8), "total_iters": rest}},
        "constant": {"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {"factor": 1.0, "total_iters": rest}},
    }
    if t.lr_scheduler not in decay:
        raise ConfigError(f"train.lr_scheduler={t.lr_scheduler}: the NeMo-RL DTensor policy supports {', '.join(decay)}")
    if warmup == 0:
        return [decay[t.lr_scheduler], {"milestones": []}]
    return [{"name": "torch.optim.lr_scheduler.LinearLR", "kwargs": {"start_factor": 1e-8, "end_factor": 1.0, "total_iters": warmup}},
            decay[t.lr_scheduler], {"milestones": [warmup]}]


def setup_seconds(cfg, converts: bool = True) -> int:
    """The start-up allowance (see SETUP_FIXED_S): megatron.setup_minutes when set, else derived from the
    model's size and the stage's weight copies (`converts`: + the HF->Megatron conversion of rl/dpo)."""
    if cfg.megatron.setup_minutes is not None:
        return 60 * cfg.megatron.setup_minutes
    copies = WEIGHT_COPIES.get(cfg.stage, 1) + (CONVERSION_COPIES if converts and cfg.stage in ("rl", "dpo") else 0)
    weight_bytes = 2 * parameter_counts(plan_from_cfg(cfg))["total"]
    return int(SETUP_FIXED_S + copies * weight_bytes / SETUP_IO_BYTES_PER_S)


def must_save_by(cfg) -> str | None:
    """checkpointing.checkpoint_must_save_by ('DD:HH:MM:SS', nemo_rl/utils/timer.py:264-276): on SLURM, the
    job's time limit less the USR1 lead (cluster.signal_seconds) and the start-up allowance (setup_seconds:
    the TimeoutChecker starts with the first iteration), so NeMo-RL saves before the limit."""
    if cfg.executor != "slurm":
        return None
    setup = setup_seconds(cfg)
    seconds = slurm_time_seconds(cfg.cluster.time) - cfg.cluster.signal_seconds - setup
    if seconds < 60:
        raise ConfigError(f"cluster.time={cfg.cluster.time} leaves {seconds} s for {cfg.stage} after cluster.signal_seconds="
                          f"{cfg.cluster.signal_seconds} and a start-up allowance of {setup // 60} min (megatron.setup_minutes)")
    days, rem = divmod(seconds, 86400)
    return f"{days:02d}:{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}"


def _dtensor_policy(cfg) -> dict:
    """The rm policy's DTensor settings, all set (none inherited): the v1 worker (module docstring)."""
    p = cfg.parallel
    return {"_v2": False, "enabled": True, "tensor_parallel_size": p.tp, "context_parallel_size": p.cp,
            "sequence_parallel": p.sequence_parallel, "activation_checkpointing": p.recompute,
            "cpu_offload": False, "custom_parallel_plan": None}


def _preference_data(cfg) -> dict:
    return {
        "max_input_seq_length": cfg.train.seq_len,
        "train": {"dataset_name": "PreferenceDataset", "data_path": str(data_path(cfg, "train")), "split": None},
        "validation": {"dataset_name": "PreferenceDataset", "data_path": str(data_path(cfg, "validation")), "split": None},
    }


def _validation(cfg, eval_steps: int) -> dict:
    """rm/dpo validation: all of it (val_batches -1), at the training batch sizes, every eval_steps and at
    the last step, never before the first (dpo.yaml has val_at_start true, rm.yaml val_at_end false)."""
    t = cfg.train
    return {"val_period": eval_steps, "val_batches": -1, "val_global_batch_size": t.global_batch,
            "val_micro_batch_size": t.micro_batch, "val_at_start": False, "val_at_end": True}


def logger_config(cfg) -> dict:
    """train.report_to -> NeMo-RL's logger (utils/logger.py:950-985): TensorBoard under OUT/logs/exp_N/
    tensorboard, W&B with our project and run name. W&B reads its credentials itself (the user's
    `wandb login` or WANDB_API_KEY); nothing here writes them."""
    from recipes.curves import reporters, run_name, wandb_project

    names = reporters(cfg.train.report_to)
    return {"log_dir": str(out_dir(cfg) / "logs"), "tensorboard_enabled": "tensorboard" in names,
            "wandb_enabled": "wandb" in names, "mlflow_enabled": False, "swanlab_enabled": False,
            "wandb": {"project": wandb_project(cfg), "name": run_name(cfg)}}


def nemo_rl_config(cfg, rows: int | None = None, policy_model: str | None = None) -> dict:
    """The NeMo-RL document for cfg.stage (merged by NeMo-RL over its example config). rows: training
    rows (the job passes the real count after the length and selection rules; submission, the plan's
    estimate). policy_model: what the job hands NeMo-RL as the policy (policy_source_link)."""
    if cfg.stage not in EXAMPLE_CONFIG:
        raise ConfigError(f"stage {cfg.stage} does not run on NeMo-RL (rm, rl, dpo do)")
    t, stage = cfg.train, cfg.stage
    nodes, gpus = job_nodes(cfg)
    if rows is None:
        from recipes.megatron.plan import count_rows

        rows = count_rows(cfg)[0]
    steps = planned_steps(cfg, rows)
    model = policy_model or _policy_source(cfg)
    policy: dict = {
        "model_name": model,
        "tokenizer": {"name": model, "chat_template": "default"},  # the model's own template, as engine=hf
        "train_global_batch_size": t.global_batch,
        "train_micro_batch_size": t.micro_batch,
        "max_total_sequence_length": t.seq_len,
        "precision": "bfloat16" if t.bf16 else "float32",
    }
    # Both bounds set: NeMo-RL stops at min(max_num_steps, max_num_epochs x batches per epoch).
    algorithm: dict = {"seed": cfg.seed, "max_num_steps": steps,
                       "max_num_epochs": max(1, math.ceil(steps / steps_per_epoch(cfg, rows)))}
    document: dict = {"defaults": str(Path(cfg.megatron.nemo_rl_dir) / "examples" / "configs" / EXAMPLE_CONFIG[stage])}
    checkpointing: dict = {"enabled": True, "checkpoint_dir": str(out_dir(cfg) / "checkpoints"),
                           "keep_top_k": t.save_total_limit, "checkpoint_must_save_by": must_save_by(cfg)}

    if stage == "rm":
        if not cfg.parallel.fsdp or cfg.parallel.pp != 1:
            raise ConfigError(
                f"rm on NeMo-RL needs parallel.fsdp=true and pp=1 (got fsdp={cfg.parallel.fsdp}, pp={cfg.parallel.pp}):"
                " NeMo-RL trains reward models only on its DTensor backend"
            )
        if cfg.rm.center_rewards_coefficient is not None:
            raise ConfigError("rm.center_rewards_coefficient: engine=hf only (TRL's RewardTrainer); NeMo-RL v0.7.0's "
                              "Bradley-Terry loss has no centring term")
        from recipes.rm import evaluation_cadence

        eval_steps, save_steps = evaluation_cadence(cfg, steps)
        selects = cfg.rm.selection_fraction > 0
        policy["tokenizer"]["name"] = str(tokenizer_dir(cfg))
        policy["reward_model_cfg"] = {"enabled": True, "reward_model_type": "bradley_terry"}
        policy["dtensor_cfg"] = _dtensor_policy(cfg)
        policy["megatron_cfg"] = {"enabled": False}
        policy["make_sequence_length_divisible_by"] = cfg.parallel.tp
        policy["optimizer"] = {"kwargs": {"lr": t.lr, "weight_decay": t.weight_decay}}
        policy["scheduler"] = torch_scheduler(cfg, steps)
        data = _preference_data(cfg)
        if selects:
            algorithm.update(_validation(cfg, eval_steps))
            checkpointing.update(save_period=save_steps, metric_name=VALIDATION_METRIC, higher_is_better=False)
        else:  # no held-out slice: no validation (pairs/validation is the eval's), the latest k checkpoints kept
            algorithm.update(val_period=0, val_at_start=False, val_at_end=False)
            checkpointing.update(save_period=save_steps, metric_name=None)
            data["validation"] = None
        document.update(rm=algorithm, policy=policy, data=data)
    elif stage == "dpo":
        if cfg.dpo.loss_type != "sigmoid":
            raise ConfigError(f"dpo.loss_type={cfg.dpo.loss_type}: NeMo-RL v0.7.0's DPO has the sigmoid (DPO) loss only "
                              "(-logsigmoid, algorithms/loss/loss_functions.py:810-823; dpo.yaml:18 lists others as a TODO); use engine=hf")
        policy["dtensor_cfg"] = {"enabled": False}
        policy["megatron_cfg"] = {**_megatron_policy(cfg), "scheduler": _megatron_schedule(cfg, steps)}
        # The Megatron optimizer and scheduler (megatron_cfg.*) replace the DTensor ones, as in
        # NeMo-RL's grpo_math_70B_megatron.yaml.
        policy["optimizer"] = None
        policy["scheduler"] = None
        policy["make_sequence_length_divisible_by"] = cfg.parallel.tp
        algorithm.update(_validation(cfg, t.eval_steps),
                         reference_policy_kl_penalty=cfg.dpo.beta, preference_loss_weight=1, sft_loss_weight=0)
        checkpointing.update(save_period=t.save_steps, metric_name=VALIDATION_METRIC, higher_is_better=False)
        document.update(dpo=algorithm, policy=policy, data=_preference_data(cfg))
    else:  # rl: RLOO = GRPO with the leave-one-out baseline and no reward normalisation
        if not cfg.reward_model:
            raise ConfigError("rl needs reward_model=PATH (the rm stage's HF checkpoint)")
        policy["megatron_cfg"] = {**_megatron_policy(cfg), "scheduler": _megatron_schedule(cfg, steps)}
        policy["generation"] = {
            "backend": "vllm",
            "max_new_tokens": cfg.rl.max_new_tokens,
            "temperature": cfg.rl.temperature,
            "top_p": cfg.rl.top_p,
            "vllm_cfg": {"tensor_parallel_size": cfg.megatron.vllm_tp,
                         "gpu_memory_utilization": cfg.megatron.vllm_gpu_memory_utilization,
                         "max_model_len": t.seq_len},
        }
        algorithm.update(
            num_prompts_per_step=cfg.rl.prompts_per_step,
            num_generations_per_prompt=cfg.rl.k,
            use_leave_one_out_baseline=True,
            normalize_rewards=False,
            overlong_filtering=cfg.rl.mask_truncated_completions,
            val_period=0, val_at_start=False, val_at_end=False,
        )
        checkpointing.update(save_period=t.save_steps, metric_name=None)  # no validation: the latest k are kept
        # Multi-node: whole nodes for the reward model (NeMo-RL's grpo setup gives the policy the rest).
        # One node (tests, tiny models): one GPU of it.
        if nodes > 1:
            reward_resources = {"gpus_per_node": gpus, "num_nodes": cfg.megatron.reward_model_nodes}
        else:
            reward_resources = {"gpus_per_node": 1, "num_nodes": 1}
        document.update(
            grpo=algorithm,
            loss_fn={"reference_policy_kl_penalty": cfg.rl.kl_coef},
            policy=policy,
            data={
                "max_input_seq_length": t.seq_len,
                "train": {"dataset_name": "ResponseDataset", "data_path": str(data_path(cfg, "train")),
                          "split": None, "split_validation_size": 0},
                "validation": None,
                "default": {"dataset_name": "ResponseDataset", "processor": EDIT_PROCESSOR,
                            "env_name": "reward_model", "prompt_file": None, "system_prompt_file": None},
            },
            env={"reward_model": {
                "model_name": _model_location(cfg, cfg.reward_model),
                "tokenizer": {"name": _model_location(cfg, cfg.reward_model)},
                "precision": "bfloat16",
                "batch_size": t.micro_batch,
                "checkpoint_path": None,
                "max_model_len": t.seq_len,
                "offload_optimizer_for_logprob": False,  # the env's config is also its Policy's config
                "resources": reward_resources,
                # The environment asserts all of these (reward_model_environment.py).
                "dtensor_cfg": {"_v2": True, "enabled": True, "tensor_parallel_size": reward_resources["gpus_per_node"],
                                "context_parallel_size": 1,
                                "sequence_parallel": False, "cpu_offload": False, "activation_checkpointing": False,
                                "custom_parallel_plan": None},
                "reward_model_cfg": {"enabled": True, "reward_model_type": "bradley_terry"},
                "dynamic_batching": {"enabled": False},
                "sequence_packing": {"enabled": False},
                "max_grad_norm": None,
            }},
        )
    document["checkpointing"] = checkpointing
    document["logger"] = logger_config(cfg)
    document["cluster"] = {"gpus_per_node": gpus, "num_nodes": nodes}
    return document


def command_script(command: list[str]) -> str:
    return "#!/usr/bin/env bash\n# run inside the container, from the repository root\nset -euo pipefail\n" + shlex.join(command) + "\n"


def stage_config_path(cfg) -> Path:
    return out_dir(cfg) / "config.yaml"


def build_command(cfg) -> list[str]:
    """The driver command (run once, on the Ray head node, inside NeMo-RL's container): our wrapper, which
    writes the data hand-over and then runs NeMo-RL's entry point (megatron.nemo_rl_dir/ENTRY) in-process."""
    entry = str(Path(cfg.megatron.nemo_rl_dir) / ENTRY_POINT[cfg.stage])
    return ["python", "-m", "recipes.megatron.nemo_rl", "--stage-config", str(stage_config_path(cfg)),
            "--entry", entry, "--config", str(config_path(cfg))]


def render_config(cfg, rows: int | None = None, policy_model: str | None = None) -> str:
    header = (f"# NeMo-RL {cfg.megatron.nemo_rl_version} ({cfg.megatron.nemo_rl_commit}) config for our {cfg.stage} stage,"
              f" rendered by recipes.megatron.nemo_rl\n")
    text = header + yaml.safe_dump(nemo_rl_config(cfg, rows, policy_model), sort_keys=False, allow_unicode=True)
    atomic_write_text(config_path(cfg), text)
    return text


def render(cfg) -> dict[str, str]:
    """config.yaml, nemo_rl_STAGE.yaml and command.sh in OUT; reads no data (the job writes the hand-over)."""
    validate_plan(plan_from_cfg(cfg))
    files = {str(config_path(cfg)): render_config(cfg),
             str(stage_config_path(cfg)): to_yaml(cfg),
             str(out_dir(cfg) / "command.sh"): command_script(build_command(cfg))}
    for path, content in list(files.items())[1:]:
        atomic_write_text(path, content)
    return files


def run(cfg) -> dict:
    """Render, then run the wrapper here (one node, or inside a Ray cluster the SLURM job started)."""
    files = render(cfg)
    command = build_command(cfg)
    if cfg.dry_run:
        print(files[str(config_path(cfg))], end="")
        print("command:", shlex.join(command))
        print(f"{cfg.stage} (megatron/NeMo-RL, dry run): wrote {config_path(cfg)} and command.sh; nothing was run")
        return {"stage": cfg.stage, "metric": "dry_run", "value": 0, "out": cfg.out}
    import subprocess

    print("running:", shlex.join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode == preemption.PREEMPTED_EXIT_CODE:
        raise UserError(f"NeMo-RL {cfg.stage} stopped at a checkpoint (exit {result.returncode}); rerun to resume")
    if result.returncode:
        raise UserError(f"NeMo-RL {cfg.stage} exited with {result.returncode} (command: {shlex.join(command)})")
    return json.loads((out_dir(cfg) / "summary.json").read_text())


# ---- in the container: data hand-over, the edit-prompt processor, then NeMo-RL's own entry point ----

def edit_prompt_processor(datum_dict, task_data_spec, tokenizer, max_seq_length, idx):
    """NeMo-RL data processor for our multi-turn edit prompts: one message per turn, each with its own
    raw `content` and the token ids of its chat-templated chunk (NeMo-RL's get_formatted_message_log,
    the generation prompt on the last user turn). The reward-model environment re-templates the
    rollout's role/content messages itself (reward_model_environment.py:202-211, rollouts.py:481), so the
    reward model sees the conversation exactly as rm training formatted it (processors.py:265-272);
    pre-templated text in one user message would be templated twice."""
    from nemo_rl.data.llm_message_utils import get_formatted_message_log

    messages = [{"role": m["role"], "content": m["content"]} for m in datum_dict["messages"]]
    if task_data_spec.system_prompt:
        messages = [{"role": "system", "content": task_data_spec.system_prompt}] + messages
    formatted = get_formatted_message_log(messages, tokenizer, task_data_spec, add_bos_token=True,
                                          add_eos_token=False, add_generation_prompt=True)
    message_log = [{**chunk, "content": raw["content"]} for chunk, raw in zip(formatted, messages)]
    length = sum(len(m["token_ids"]) for m in message_log)
    loss_multiplier = 1.0
    if length >= max_seq_length:  # too long: keep stubs and mask the row out, as NeMo-RL's processors do
        for message in message_log:
            message["token_ids"] = message["token_ids"][: min(4, max_seq_length // len(message_log))]
        length, loss_multiplier = sum(len(m["token_ids"]) for m in message_log), 0.0
    return {
        "message_log": message_log,
        "length": length,
        "extra_env_info": {"ground_truth": datum_dict.get("reference_edit", "")},
        "loss_multiplier": loss_multiplier,
        "idx": idx,
        "task_name": datum_dict["task_name"],
    }


def load_stage_config(path: str):
    """The stage's resolved config as render wrote it (OUT/config.yaml)."""
    from omegaconf import OmegaConf

    from recipes.config import RunConfig

    return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))


class StopWatch:
    """Wraps NeMo-RL's TimeoutChecker.check_save (timer.py:284): also True once the batch script's
    USR1 request file exists, and remembers whether it ever said "save and stop"."""

    def __init__(self, out: Path):
        self.request = out / preemption.PREEMPT_REQUEST_FILE
        self.fired = False

    def install(self, checker_cls) -> None:
        original = checker_cls.check_save
        watch = self

        def check_save(checker):
            stop = bool(original(checker)) or watch.request.exists()
            watch.fired = watch.fired or stop
            return stop

        checker_cls.check_save = check_save


def prepare(cfg) -> dict:
    """Everything the job does before NeMo-RL starts: the init model's tokenizer (rm: saved with its distinct
    pad for NeMo-RL), the data hand-over, the policy's content-named source (rl, dpo) and the final YAML.
    Returns the data counts (for the log and summary.json)."""
    from recipes import training

    tokenizer = training.load_tokenizer(cfg)
    if cfg.stage == "rm":
        tokenizer.save_pretrained(str(tokenizer_dir(cfg)))
    counts = write_data(cfg, tokenizer)
    policy_model = policy_source_link(cfg) if cfg.stage in ("rl", "dpo") else None
    render_config(cfg, counts["train"], policy_model)
    return counts


def run_entry(args, cfg) -> int:
    """Data hand-over, final YAML, processor, NeMo-RL's entry point; exit code for the batch script."""
    out = out_dir(cfg)
    counts = prepare(cfg)
    print(f"{cfg.stage}: {counts['train']} training / {counts['validation']} validation rows -> {out / 'data'}"
          + (f"; skipped as too long: {counts['skipped_too_long']['train']}" if "skipped_too_long" in counts else ""),
          flush=True)
    if cfg.stage == "rl":
        from nemo_rl.data.processors import register_processor

        register_processor(EDIT_PROCESSOR, edit_prompt_processor)
    from nemo_rl.utils import timer

    watch = StopWatch(out)
    watch.install(timer.TimeoutChecker)
    start = time.monotonic()
    sys.argv = [args.entry, *args.rest]
    runpy.run_path(args.entry, run_name="__main__")
    if watch.fired:
        atomic_write_json(out / preemption.PREEMPTED_MARKER_FILE, {"stage": cfg.stage})
        print(f"{cfg.stage}: NeMo-RL saved a checkpoint and stopped early (time limit or USR1); exit "
              f"{preemption.PREEMPTED_EXIT_CODE} to requeue and resume", flush=True)
        return preemption.PREEMPTED_EXIT_CODE
    summary = {"stage": cfg.stage, "metric": "exit_code", "value": 0.0, "wall_s": round(time.monotonic() - start, 1),
               "out": str(cfg.out), "checkpoints": str(out / "checkpoints"), "data": counts}
    atomic_write_json(out / "summary.json", summary)
    print(f"{cfg.stage}: NeMo-RL finished in {summary['wall_s']:.0f} s -> {out / 'checkpoints'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a NeMo-RL entry point for one of our stages (inside NeMo-RL's container)")
    parser.add_argument("--stage-config", required=True, help="OUT/config.yaml: the stage's resolved config")
    parser.add_argument("--entry", required=True, help="NeMo-RL's examples/run_*.py")
    args, rest = parser.parse_known_args(argv)
    args.rest = rest
    return run_entry(args, load_stage_config(args.stage_config))


if __name__ == "__main__":
    from hs3.io import cli_main

    sys.exit(cli_main(main)(sys.argv[1:]))
