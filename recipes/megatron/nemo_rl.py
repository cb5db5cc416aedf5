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
processors renders (math_hf_data_processor keeps only the first user turn), so rl runs
examples/run_grpo.py through `python -m recipes.megatron.nemo_rl` after registering one processor,
`hs3_edit_prompt`, with NeMo-RL's register_processor.
"""
from __future__ import annotations

import argparse
import runpy
import shlex
import sys
import time
from pathlib import Path

import yaml

from recipes.config import ConfigError, to_yaml
from recipes.io import UserError, atomic_write_jsonl, atomic_write_text, read_jsonl
from recipes.megatron import job_nodes, megatron_decay_style
from recipes.megatron.plan import plan_from_cfg, validate_plan
from recipes.training import write_summary

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


def nemo_rl_config(cfg) -> dict:
    """The NeMo-RL document for cfg.stage (merged by NeMo-RL over its example config)."""
    if cfg.stage not in EXAMPLE_CONFIG:
        raise ConfigError(f"stage {cfg.stage} does not run on NeMo-RL (rm, rl, dpo do)")
    t, stage = cfg.train, cfg.stage
    nodes, gpus = job_nodes(cfg)
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
        document.update(rm=algorithm, policy=policy, data=_preference_data(cfg))
    elif stage == "dpo":
        policy["dtensor_cfg"] = {"enabled": False}
        policy["megatron_cfg"] = _megatron_policy(cfg)
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
        policy["megatron_cfg"] = _megatron_policy(cfg)
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
                                 "save_period": t.save_steps, "keep_top_k": t.save_total_limit}
    document["logger"] = {"log_dir": str(out_dir(cfg) / "logs"), "wandb_enabled": False, "tensorboard_enabled": True}
    document["cluster"] = {"gpus_per_node": gpus, "num_nodes": nodes}
    return document


def command_script(command: list[str]) -> str:
    return "#!/usr/bin/env bash\n# run inside the container, from the repository root\nset -euo pipefail\n" + shlex.join(command) + "\n"


def build_command(cfg) -> list[str]:
    """The driver command (run once, on the Ray head node, inside NeMo-RL's container)."""
    entry = str(Path(cfg.megatron.nemo_rl_dir) / ENTRY_POINT[cfg.stage])
    if cfg.stage == "rl":
        return ["python", "-m", "recipes.megatron.nemo_rl", "--entry", entry, "--config", str(config_path(cfg))]
    return ["python", entry, "--config", str(config_path(cfg))]


def render(cfg, write_inputs: bool = True) -> dict[str, str]:
    validate_plan(plan_from_cfg(cfg))
    if write_inputs:
        write_data(cfg)
    header = (f"# NeMo-RL {cfg.megatron.nemo_rl_version} ({cfg.megatron.nemo_rl_commit}) config for our {cfg.stage} stage,"
              f" rendered by recipes.megatron.nemo_rl\n")
    text = header + yaml.safe_dump(nemo_rl_config(cfg), sort_keys=False, allow_unicode=True)
    files = {str(config_path(cfg)): text, str(out_dir(cfg) / "config.yaml"): to_yaml(cfg),
             str(out_dir(cfg) / "command.sh"): command_script(build_command(cfg))}
    for path, content in files.items():
        atomic_write_text(path, content)
    return files


def _inputs_exist(cfg) -> bool:
    folder = "prompts" if cfg.stage == "rl" else "pairs"
    return (Path(cfg.data_dir) / folder / "train.jsonl").is_file()


def run(cfg) -> dict:
    """Render, then run NeMo-RL's entry point here (one node, or inside a Ray cluster the SLURM job started)."""
    files = render(cfg, write_inputs=not cfg.dry_run or _inputs_exist(cfg))
    command = build_command(cfg)
    if cfg.dry_run:
        print(files[str(config_path(cfg))], end="")
        print("command:", shlex.join(command))
        print(f"{cfg.stage} (megatron/NeMo-RL, dry run): wrote {config_path(cfg)} and command.sh; nothing was run")
        return {"stage": cfg.stage, "metric": "dry_run", "value": 0, "out": cfg.out}
    import subprocess

    start = time.monotonic()
    print("running:", shlex.join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode:
        raise UserError(f"NeMo-RL {cfg.stage} exited with {result.returncode} (command: {shlex.join(command)})")
    return write_summary(cfg, "exit_code", 0.0, start, checkpoints=str(out_dir(cfg) / "checkpoints"))


# ---- in the container: the multi-turn edit-prompt processor, then NeMo-RL's own entry point --------

def edit_prompt_processor(datum_dict, task_data_spec, tokenizer, max_seq_length, idx):
    """NeMo-RL data processor: the whole conversation up to the edit request, with the generation prompt
    (same DatumSpec as NeMo-RL's math_hf_data_processor, which keeps only the first user turn)."""
    messages = list(datum_dict["messages"])
    if task_data_spec.system_prompt:
        messages = [{"role": "system", "content": task_data_spec.system_prompt}] + messages
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_special_tokens=False)
    token_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    loss_multiplier = 1.0
    if len(token_ids) >= max_seq_length:  # too long: keep a stub and mask it out, as NeMo-RL's processors do
        token_ids, loss_multiplier = token_ids[: min(4, max_seq_length)], 0.0
    return {
        "message_log": [{"role": "user", "content": text, "token_ids": token_ids}],
        "length": len(token_ids),
        "extra_env_info": {"ground_truth": datum_dict.get("reference_edit", "")},
        "loss_multiplier": loss_multiplier,
        "idx": idx,
        "task_name": datum_dict["task_name"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a NeMo-RL entry point with the edit-prompt processor registered")
    parser.add_argument("--entry", required=True, help="NeMo-RL's examples/run_grpo.py")
    args, rest = parser.parse_known_args(argv)
    from nemo_rl.data.processors import register_processor

    register_processor(EDIT_PROCESSOR, edit_prompt_processor)
    sys.argv = [args.entry, *rest]
    runpy.run_path(args.entry, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
