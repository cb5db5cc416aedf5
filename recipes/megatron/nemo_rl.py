"""rm / rl / dpo on NeMo-RL: our stage config -> a NeMo-RL YAML in its own schema, run by its entry points.

    ./launch.sh rm  engine=megatron model=llama33_70b [--dry-run]   -> examples/run_rm.py   (Bradley-Terry)
    ./launch.sh rl  engine=megatron model=llama33_70b [--dry-run]   -> examples/run_grpo.py (RLOO)
    ./launch.sh dpo engine=megatron model=llama33_70b [--dry-run]   -> examples/run_dpo.py

Each rendered YAML starts with `defaults: NEMO_RL_DIR/examples/configs/<example>.yaml` (NeMo-RL's own
config inheritance) and sets only what our stage config decides, so every other key keeps the value
NeMo-RL ships at the pinned commit:
  rm  <- rm.yaml: Bradley-Terry on the DTensor backend (NeMo-RL has no Megatron reward models).
  rl  <- grpo_math_70B_megatron.yaml: GRPO with use_leave_one_out_baseline=true and
         normalize_rewards=false (= RLOO), reward from our rm checkpoint through NeMo-RL's
         reward-model environment, KL penalty rl.kl_coef, k generations per prompt, vLLM, Megatron policy.
  dpo <- dpo.yaml, with a Megatron policy.
Data is handed over in the formats their loaders read: pairs -> PreferenceDataset rows
({"context", "completions": [{"rank", "completion"}]}); RL prompts -> ResponseDataset rows with a
`messages` column. RL prompts are multi-turn conversations, which none of NeMo-RL's built-in
processors renders (math_hf_data_processor keeps only the first user turn), so rl registers one
processor, `hs3_edit_prompt`, with NeMo-RL's register_processor: one message per turn, each with its
raw text, as the reward model saw conversations in rm training.

Every stage runs as `python -m recipes.megatron.nemo_rl --stage-config OUT/config.yaml --entry ENTRY
--config OUT/nemo_rl_STAGE.yaml` on the Ray head node. Submission renders the files without reading any
data (a pipeline submits rm before its data job has run); the wrapper, in the job, writes the data
hand-over, re-renders the NeMo-RL YAML with the real row counts, then runs NeMo-RL's entry point
in-process. Stopping early: NeMo-RL saves and returns when its TimeoutChecker says so
(checkpointing.checkpoint_must_save_by, set from the SLURM time limit; rm.py:585,702-704 and
grpo.py:2880 at v0.7.0); the wrapper also lets the batch script's USR1 request file trigger that same
save, and then exits PREEMPTED_EXIT_CODE so SLURM requeues the job and it resumes from the checkpoint
(NeMo-RL resumes from its checkpoint_dir by itself) instead of ending COMPLETED with a partial model.

kl_coef: on the HF engine (TRL's RLOO) rl.kl_coef is a per-token KL penalty subtracted from the reward;
with the GRPO/RLOO advantage estimator NeMo-RL has no reward-side KL (its use_kl_in_reward works only
with the reinforce_plus_plus estimator, advantage_estimator.py:158-220 at v0.7.0): rl.kl_coef becomes
loss_fn.reference_policy_kl_penalty, the weight of a KL estimate (reference_policy_kl_type: k3 in
grpo_math_1B.yaml:56-59) added to the policy loss (algorithms/loss/loss_functions.py:126,225). Same knob,
same direction, not the same objective: a value tuned on one engine is a starting point on the other.
"""
from __future__ import annotations

import argparse
import json
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
from recipes.megatron.plan import plan_from_cfg, validate_plan

EXAMPLE_CONFIG = {"rm": "rm.yaml", "rl": "grpo_math_70B_megatron.yaml", "dpo": "dpo.yaml"}
ENTRY_POINT = {"rm": "examples/run_rm.py", "rl": "examples/run_grpo.py", "dpo": "examples/run_dpo.py"}
SECTION = {"rm": "rm", "rl": "grpo", "dpo": "dpo"}  # NeMo-RL's algorithm section per stage
EDIT_PROCESSOR = "hs3_edit_prompt"
SPLITS = ("train", "validation")


def out_dir(cfg) -> Path:
    return Path(cfg.out).resolve()


def config_path(cfg) -> Path:
    return out_dir(cfg) / f"nemo_rl_{cfg.stage}.yaml"


def data_path(cfg, split: str) -> Path:
    return out_dir(cfg) / "data" / f"{split}.jsonl"


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


def write_data(cfg) -> dict[str, int]:
    folder, convert = ("prompts", prompt_row) if cfg.stage == "rl" else ("pairs", preference_row)
    counts = {}
    for split in SPLITS:
        source = Path(cfg.data_dir) / folder / f"{split}.jsonl"
        if not source.is_file():
            raise UserError(f"{source}: no such file (run the data stage first: ./launch.sh data)")
        rows = [convert(row, source, i + 1) for i, row in enumerate(read_jsonl(source))]
        counts[split] = atomic_write_jsonl(data_path(cfg, split), rows)
    return counts


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




def planned_steps(cfg, rows: int) -> int:
    """Optimizer steps NeMo-RL will take: min(max_num_steps, epochs x full batches) (rm.py: drop_last=True)."""
    t = cfg.train
    per_epoch = max(rows // (cfg.rl.prompts_per_step if cfg.stage == "rl" else t.global_batch), 1)
    steps = max(1, int(round(t.epochs)) * per_epoch)
    return min(steps, t.max_steps) if t.max_steps > 0 else steps


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


def must_save_by(cfg) -> str | None:
    """checkpointing.checkpoint_must_save_by ('DD:HH:MM:SS', nemo_rl/utils/timer.py:264-276): on SLURM, the
    job's time limit less the USR1 lead (cluster.signal_seconds) and megatron.setup_minutes (Ray, model
    loading: the TimeoutChecker starts with the first iteration), so NeMo-RL saves before the limit."""
    if cfg.executor != "slurm":
        return None
    seconds = slurm_time_seconds(cfg.cluster.time) - cfg.cluster.signal_seconds - 60 * cfg.megatron.setup_minutes
    if seconds < 60:
        raise ConfigError(f"cluster.time={cfg.cluster.time} leaves {seconds} s for {cfg.stage} after cluster.signal_seconds="
                          f"{cfg.cluster.signal_seconds} and megatron.setup_minutes={cfg.megatron.setup_minutes}")
    days, rem = divmod(seconds, 86400)
    return f"{days:02d}:{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}"


def _dtensor_policy(cfg) -> dict:
    p = cfg.parallel
    return {"enabled": True, "tensor_parallel_size": p.tp, "context_parallel_size": p.cp,
            "sequence_parallel": p.sequence_parallel, "activation_checkpointing": p.recompute}


def _preference_data(cfg) -> dict:
    return {
        "max_input_seq_length": cfg.train.seq_len,
        "train": {"dataset_name": "PreferenceDataset", "data_path": str(data_path(cfg, "train")), "split": None},
        "validation": {"dataset_name": "PreferenceDataset", "data_path": str(data_path(cfg, "validation")), "split": None},
    }


def nemo_rl_config(cfg, rows: int | None = None) -> dict:
    """The NeMo-RL document for cfg.stage (merged by NeMo-RL over its example config). rows: training
    rows (the job passes the real count; submission, the plan's estimate)."""
    if cfg.stage not in EXAMPLE_CONFIG:
        raise ConfigError(f"stage {cfg.stage} does not run on NeMo-RL (rm, rl, dpo do)")
    t, stage = cfg.train, cfg.stage
    nodes, gpus = job_nodes(cfg)
    if rows is None:
        from recipes.megatron.plan import count_rows

        rows = count_rows(cfg)[0]
    steps = planned_steps(cfg, rows)
    model = _policy_source(cfg)
    policy: dict = {
        "model_name": model,
        "tokenizer": {"name": model},
        "train_global_batch_size": t.global_batch,
        "train_micro_batch_size": t.micro_batch,
        "max_total_sequence_length": t.seq_len,
        "precision": "bfloat16" if t.bf16 else "float32",
    }
    algorithm: dict = {"seed": cfg.seed, "val_period": t.eval_steps}
    if t.max_steps > 0:
        algorithm["max_num_steps"] = t.max_steps
    else:
        algorithm["max_num_epochs"] = max(1, int(round(t.epochs)))
    document: dict = {"defaults": str(Path(cfg.megatron.nemo_rl_dir) / "examples" / "configs" / EXAMPLE_CONFIG[stage])}

    if stage == "rm":
        if not cfg.parallel.fsdp or cfg.parallel.pp != 1:
            raise ConfigError(
                f"rm on NeMo-RL needs parallel.fsdp=true and pp=1 (got fsdp={cfg.parallel.fsdp}, pp={cfg.parallel.pp}):"
                " NeMo-RL trains reward models only on its DTensor backend"
            )
        policy["reward_model_cfg"] = {"enabled": True, "reward_model_type": "bradley_terry"}
        policy["dtensor_cfg"] = _dtensor_policy(cfg)
        policy["megatron_cfg"] = {"enabled": False}
        policy["optimizer"] = {"kwargs": {"lr": t.lr, "weight_decay": t.weight_decay}}
        policy["scheduler"] = torch_scheduler(cfg, steps)
        document.update(rm=algorithm, policy=policy, data=_preference_data(cfg))
    elif stage == "dpo":
        policy["dtensor_cfg"] = {"enabled": False}
        policy["megatron_cfg"] = {**_megatron_policy(cfg), "scheduler": _megatron_schedule(cfg, steps)}
        # The Megatron optimizer and scheduler (megatron_cfg.*) replace the DTensor ones, as in
        # NeMo-RL's grpo_math_70B_megatron.yaml.
        policy["optimizer"] = None
        policy["scheduler"] = None
        policy["make_sequence_length_divisible_by"] = cfg.parallel.tp
        algorithm.update(reference_policy_kl_penalty=cfg.dpo.beta, preference_loss_weight=1, sft_loss_weight=0)
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
        )
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
                "validation": {"dataset_name": "ResponseDataset", "data_path": str(data_path(cfg, "validation")),
                               "split": None},
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
    document["checkpointing"] = {"enabled": True, "checkpoint_dir": str(out_dir(cfg) / "checkpoints"),
                                 "save_period": t.save_steps, "keep_top_k": t.save_total_limit,
                                 "checkpoint_must_save_by": must_save_by(cfg)}
    document["logger"] = {"log_dir": str(out_dir(cfg) / "logs"), "wandb_enabled": False, "tensorboard_enabled": True}
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


def render_config(cfg, rows: int | None = None) -> str:
    header = (f"# NeMo-RL {cfg.megatron.nemo_rl_version} ({cfg.megatron.nemo_rl_commit}) config for our {cfg.stage} stage,"
              f" rendered by recipes.megatron.nemo_rl\n")
    text = header + yaml.safe_dump(nemo_rl_config(cfg, rows), sort_keys=False, allow_unicode=True)
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


def run_entry(args, cfg) -> int:
    """Data hand-over, final YAML, processor, NeMo-RL's entry point; exit code for the batch script."""
    out = out_dir(cfg)
    counts = write_data(cfg)
    render_config(cfg, counts["train"])
    print(f"{cfg.stage}: {counts['train']} training / {counts['validation']} validation rows -> {out / 'data'}", flush=True)
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
               "out": str(cfg.out), "checkpoints": str(out / "checkpoints")}
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
