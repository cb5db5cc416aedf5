"""HF-engine glue shared by the four training stages (recipes/sft.py, rm.py, rl.py, dpo.py).

Each stage file reads top to bottom and calls, in order:
    preflight(cfg, files...)       `--dry-run` (print the config, load nothing); check_inputs: data files,
                                   init, reward model, out dir (one-line ConfigError, nothing loaded);
                                   maybe_relaunch: re-exec under `accelerate launch` for several processes
    prepare_output_dir(cfg)        OUT/config.yaml and OUT/data_manifest.sha256
    common_args(cfg, TRLConfigClass, ...)    TrainingArguments from cfg.train (+ stage keys)
    lora_config(cfg, task_type)    PEFT LoRA from cfg.peft (None when disabled)
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg))
    save_final(trainer, cfg, ...)  final/ = a plain transformers model (LoRA merged), + its tokenizer
    write_training_record(...)     final/hs3_training.json (see docs/architecture.md)
    write_summary(...)             summary.json for the pipeline's closing table, and a one-line summary
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recipes.config import REPO_ROOT, ConfigError, RunConfig, grad_accum_steps, load_yaml, to_yaml, validate
from recipes import curves
from hs3.io import atomic_write_json, atomic_write_text, follow_umask, sha256_file
from hs3.versions import software_versions

# Set in the processes that `accelerate launch` starts for us, so that they do not relaunch again.
CHILD_ENV = "HS3_UNDER_ACCELERATE"

# The HelpSteer3 splits each stage's own data comes from (the eval refuses to score on them).
# sft rows and rl prompts come from the `edit` subset, preference pairs from `edit_quality`.
STAGE_SPLITS = {
    "sft": ["edit/train"],
    "rm": ["edit_quality/train"],
    "dpo": ["edit_quality/train"],
    "rl": ["edit/train"],
    "feedback": ["feedback/train"],    # the Feedback model (recipes/feedback.py)
    "select": ["preference/train"],    # the Select model (recipes/select.py)
}


# ---------------------------------------------------------------------------------------------
# Inputs and the output directory (all checks here run before any model is loaded)
# ---------------------------------------------------------------------------------------------
def data_file(cfg, relative: str) -> Path:
    """A file of the data stage's output; a missing one is a one-line ConfigError."""
    path = Path(cfg.data_dir) / relative
    if not path.is_file():
        raise ConfigError(f"data_dir={cfg.data_dir}: missing data file {path} (run `./launch.sh data` first or set data=DIR)")
    return path


def model_dir(cfg, key: str) -> Optional[str]:
    """cfg.init / cfg.reward_model: None, or an existing checkpoint dir (else a one-line ConfigError)."""
    value = cfg[key]
    if value is None:
        return None
    if not (Path(value) / "config.json").is_file():
        hint = {"init": "run the stage it starts from first", "reward_model": "run the rm stage first"}[key]
        raise ConfigError(f"{key}={value}: no model there (no config.json; {hint})")
    return str(value)


def check_inputs(cfg, *data_files: str) -> None:
    """Every input of the stage exists (its data files, cfg.init, cfg.reward_model) and cfg.out is not
    another stage's or model's run: one-line ConfigError otherwise."""
    check_output_dir(cfg)
    for relative in data_files:
        path = data_file(cfg, relative)
        if relative.endswith("train.jsonl") and not _has_a_row(path):
            raise ConfigError(f"data_dir={cfg.data_dir}: {path} has no rows (an empty training split; check the data step's "
                              "rejected.jsonl)")
    model_dir(cfg, "init")
    model_dir(cfg, "reward_model")
    check_lora_targets(cfg)
    check_kernels(cfg)


def _has_a_row(path: Path) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def check_lora_targets(cfg) -> None:
    """With LoRA on: every peft.target_modules name must name modules of the model (PEFT itself fails
    only after the model is loaded, and only when none matches). The model is built on the meta device
    from its config.json: no weights are read."""
    if not cfg.peft.enabled:
        return
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        source, extra = model_source(cfg)
        config = AutoConfig.from_pretrained(source, **extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # a model that cannot be read is reported where it is loaded
        return
    full = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    names = {name.rsplit(".", 1)[-1] for name in full}
    # PEFT's rule for a list: a module matches a target when its name is the target or ends with "." + target
    missing = [t for t in cfg.peft.target_modules
               if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in full)]
    if missing:
        raise ConfigError(f"peft.target_modules: {', '.join(missing)} match no linear layer of {source} "
                          f"(its layers: {', '.join(sorted(names))})")


def check_output_dir(cfg) -> None:
    """Refuse to resume in (or overwrite) a dir that holds a run of another stage or model, or one
    trained (checkpoints or final/ exist) with settings that change the result (resume_conflicts)."""
    out = Path(cfg.out)
    previous = out / "config.yaml"
    if previous.is_file() and cfg.resume != "never":
        try:
            old = load_yaml(previous)
        except ConfigError as exc:  # a node crash mid-write, a hand edit: one line, not a YAML traceback
            raise ConfigError(f"out={out}: its config.yaml is damaged ({exc}); move it away or pick another out=") from None
        for key in ("stage", "model.path"):
            was, now = OmegaConf.select(old, key), OmegaConf.select(cfg, key)
            if was != now:
                raise ConfigError(
                    f"out={out}: holds a run with {key}={was}, not {key}={now} (pick another out= or run_dir=, or resume=never)"
                )
        if latest_checkpoint(out) or (out / "final").is_dir():
            conflicts = resume_conflicts(old, cfg)
            sha_file, manifest = out / "data_manifest.sha256", Path(cfg.data_dir) / "manifest.json"
            if sha_file.is_file():
                was = sha_file.read_text().strip()
                now = sha256_file(manifest) if manifest.is_file() else "none"
                if was != now:
                    conflicts.append(f"data (manifest sha256 {was[:12]} -> {now[:12]})")
            if conflicts:
                raise ConfigError(f"out={out}: was trained with other settings than this run's: {'; '.join(conflicts)} "
                                  "(resume=never starts over; or pick another out= or run_dir=)")


# Keys that may differ between a run and its resumption: they do not change what is trained (run
# paths and bookkeeping, the cluster it runs on, logging and checkpoint cadence, other stages' keys).
# Every other key does (compared by resume_conflicts); the data is compared by its manifest's sha256.
RESULT_NEUTRAL_KEYS = (
    "run_dir", "name", "out", "data_dir", "resume", "dry_run", "executor", "cluster", "eval", "prep",
    "megatron", "parallel", "model.name", "train.logging_steps", "train.eval_steps", "train.save_steps",
    "train.save_total_limit", "train.gradient_checkpointing", "hf.accelerate_config",
    "hf.gather_weights_for_generation", "train.report_to", "train.wandb_project", "train.run_name",
    # kernels and placement: the same model and loss, computed faster (docs/gpu.md)
    "train.packed_attention", "train.liger", "train.compile", "rl.vllm_server_url", "rl.vllm_gpus",
)


def resume_conflicts(old, new) -> list[str]:
    """`key: old -> new` for each result-changing key whose value differs between two resolved configs."""
    def flat(node, prefix=""):
        items = {}
        for key, value in (node.items() if isinstance(node, dict) else ()):
            path = f"{prefix}{key}"
            if any(path == k or path.startswith(k + ".") for k in RESULT_NEUTRAL_KEYS):
                continue
            items.update(flat(value, path + ".") if isinstance(value, dict) else {path: value})
        return items

    was = flat(OmegaConf.to_container(old, resolve=True) if not isinstance(old, dict) else old)
    now = flat(OmegaConf.to_container(new, resolve=True) if not isinstance(new, dict) else new)
    # a key only one side has was added to (or removed from) the schema since: not a change of setting
    return [f"{key}: {was[key]} -> {now[key]}" for key in sorted(set(was) & set(now)) if was[key] != now[key]]


def prepare_output_dir(cfg) -> Path:
    """cfg.out with config.yaml (the resolved config) and the data manifest's hash."""
    check_output_dir(cfg)
    out = Path(cfg.out)
    if is_main_process():
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
        manifest = Path(cfg.data_dir) / "manifest.json"
        atomic_write_text(out / "data_manifest.sha256", (sha256_file(manifest) if manifest.is_file() else "none") + "\n")
    return out


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """Why checkpoint-N cannot be resumed from, or None when it is intact: its trainer_state.json must be
    a JSON object with the step, and its weights, optimizer, scheduler and RNG files whole (hs3.io.truncated:
    a node that crashed before its writes reached the disk leaves them short)."""
    from hs3.io import truncated

    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError) as exc:
        return f"trainer_state.json cannot be read ({str(exc).splitlines()[0][:80]}: truncated?)"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return "trainer_state.json has no global_step"
    files = sorted(p for p in path.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors" or p.name in ("pytorch_model.bin", "adapter_model.bin")]
    for index in path.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{index.name} cannot be read"
        if missing := sorted(s for s in shards if not (path / s).is_file()):
            return f"{index.name} names missing shards ({', '.join(missing[:3])})"
    if not weights and not any(path.glob("global_step*")):  # DeepSpeed keeps its shards in global_stepN/
        return "no model weights"
    for file in files:
        if problem := truncated(file):
            return problem
    return None


def latest_checkpoint(out: str | os.PathLike, skipped: Optional[list] = None) -> Optional[str]:
    """The highest-numbered intact checkpoint-N in out (checkpoint_problem), or None. Newer ones that are
    not intact are passed over; with `skipped`, (path, why) of each is appended to it."""
    found = []
    for path in Path(out).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        if skipped is not None:
            skipped.append((str(path), problem))
    return None


def resume_checkpoint(cfg) -> Optional[str]:
    """What to pass to Trainer.train(resume_from_checkpoint=...): HF restores optimizer, scheduler,
    RNG states and the data position (it skips the batches already seen) from there. resume=auto takes
    the newest intact checkpoint and says which newer ones it passed over and why; resume=PATH must be intact."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        if problem := checkpoint_problem(cfg.resume):
            raise ConfigError(f"resume={cfg.resume}: cannot resume from it: {problem}")
        checkpoint = str(cfg.resume)
    else:
        skipped: list = []
        checkpoint = latest_checkpoint(cfg.out, skipped)
        for path, problem in skipped if is_main_process() else ():
            print(f"{cfg.stage}: skipping {path}: {problem}", file=sys.stderr, flush=True)
    if checkpoint and is_main_process():
        print(f"{cfg.stage}: resuming from {checkpoint}", file=sys.stderr, flush=True)
    elif is_main_process() and cfg.resume == "auto" and skipped:
        print(f"{cfg.stage}: no intact checkpoint left: starting from the beginning", file=sys.stderr, flush=True)
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Models, trainer arguments, LoRA
# ---------------------------------------------------------------------------------------------
def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def model_source(cfg) -> tuple[str, dict]:
    """Where the stage's starting weights are: cfg.init (a checkpoint of ours) or the configured base."""
    from recipes.models import resolve_model_path

    if cfg.init:
        return str(cfg.init), {}
    gguf = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
    return resolve_model_path(cfg.model), gguf


def load_model(cfg, auto_class, source: Optional[str] = None, **kwargs):
    """auto_class.from_pretrained on cfg.init / the base model (or `source`) with the configured dtype."""
    from transformers import set_seed

    from recipes.models import load_pretrained, torch_dtype

    path, extra = (source, {}) if source else model_source(cfg)
    # Weights the checkpoint lacks (the reward model's new score head) are initialised from the global
    # RNG, before Trainer seeds it: seed here so that the same config gives the same model.
    set_seed(cfg.seed)
    model = load_pretrained(
        auto_class, path, dtype=torch_dtype(cfg.model.dtype), attn_implementation=attention_implementation(cfg), **extra, **kwargs
    )
    if "gguf_file" in extra:
        # GGUF weights are dequantized to cfg.model.dtype on load; the GGUF "quantizer" left on the model
        # is only a marker, but Trainer would refuse to train it and save_pretrained would record it.
        model.hf_quantizer.remove_quantization_config(model)
    return model


def attention_implementation(cfg) -> str:
    """model.attn_implementation; for packed rows (train.packing) train.packed_attention, whose `auto` is
    flex_attention on CUDA (transformers builds a document block mask from the packed position_ids: no
    attention, and no work, across documents) and model.attn_implementation elsewhere (sdpa, with a dense
    block-diagonal mask: FlexAttention has no backward on CPU in torch 2.13)."""
    import torch

    if not cfg.train.packing:
        return cfg.model.attn_implementation
    if cfg.train.packed_attention == "auto":
        return "flex_attention" if torch.cuda.is_available() else cfg.model.attn_implementation
    return cfg.train.packed_attention


def liger_enabled(cfg) -> bool:
    """train.liger: null = on when CUDA and liger-kernel are there; true needs both (checked by check_kernels)."""
    import importlib.util

    import torch

    if cfg.train.liger is False:
        return False
    available = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    return bool(cfg.train.liger) or available


def check_kernels(cfg) -> None:
    """train.packed_attention / train.liger that cannot run here: a one-line ConfigError before any loading."""
    import importlib.util

    import torch

    from recipes.config import ATTN_IMPLEMENTATIONS

    attention = cfg.train.packed_attention
    if attention != "auto" and attention not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"train.packed_attention={attention}: not auto or one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if cfg.train.packing and attention_implementation(cfg) == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError("train.packed_attention=flex_attention: FlexAttention has no backward on CPU (torch "
                          f"{torch.__version__.split('+')[0]}); train on a GPU, or use train.packed_attention=sdpa here")
    if cfg.train.liger:
        if not torch.cuda.is_available():
            raise ConfigError("train.liger=true: Liger's kernels are Triton kernels and need a CUDA GPU (train.liger=null "
                              "turns them on wherever they can run)")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("train.liger=true: liger-kernel is not installed (EXTRAS=...,gpu ./launch.sh setup, or "
                              "pip install 'liger-kernel>=0.8.5')")


def load_tokenizer(cfg, source: Optional[str] = None):
    from recipes.models import load_tokenizer as load

    path = source or cfg.init
    tokenizer = load(cfg.model, str(path) if path else None)
    if tokenizer.chat_template is None:
        raise ConfigError(f"model {path or cfg.model.path}: its tokenizer has no chat template")
    # The pad must not be the end-of-turn token (Llama-3: <|finetune_right_pad_id|>, not <|eot_id|>): a
    # reward model reads its score at the last non-pad token (recipes/reward.py). Required by rm and rl.
    from recipes.reward import ensure_distinct_pad

    try:
        ensure_distinct_pad(tokenizer)
    except ValueError as exc:
        if cfg.stage in ("rm", "rl"):
            raise ConfigError(str(exc)) from None
    return tokenizer


# ---------------------------------------------------------------------------------------------
# One length policy: a train row longer than train.seq_len is never trained on cut
# ---------------------------------------------------------------------------------------------
def token_lengths(tokenizer, conversations: list, add_generation_prompt: bool = False) -> list[int]:
    """len(apply_chat_template(conversation)) of each conversation (data_prep's exact fast counter)."""
    from data_prep.tokens import TokenCounter

    return TokenCounter(tokenizer).count(conversations, add_generation_prompt=add_generation_prompt) if conversations else []


def pair_lengths(tokenizer, dataset) -> list[int]:
    """Per preference pair: the longer of prompt + chosen and prompt + rejected (both must fit)."""
    prompts, chosen, rejected = dataset["prompt"], dataset["chosen"], dataset["rejected"]
    both = token_lengths(tokenizer, [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)])
    return [max(a, b) for a, b in zip(both[:len(prompts)], both[len(prompts):])]


def skip_too_long(cfg, dataset, lengths: list[int], limit: int, name: str):
    """`dataset` without the rows whose sequence is over `limit` tokens, and how many were left out.
    TRL would otherwise cut them (SFT/DPO keep the start: the edit loses its end and its end-of-turn
    token) or drop them silently (RewardTrainer); here they are counted, logged and put in summary.json."""
    over = [i for i, n in enumerate(lengths) if n > limit]
    if over:
        if is_main_process():
            print(f"{cfg.stage}: skipping {len(over)} of {len(lengths)} {name} rows longer than {limit} tokens "
                  f"(longest {max(lengths)}); build the data with prep.max_seq_len={limit} to reject them there",
                  file=sys.stderr, flush=True)
        dataset = dataset.select([i for i, n in enumerate(lengths) if n <= limit])
    return dataset, len(over)


def common_args(cfg, args_class, *, evaluate: bool = True, **stage_kwargs):
    """The TRL config object (SFTConfig, RewardConfig, ...) with everything cfg.train decides."""
    import torch

    t = cfg.train
    scheduler, scheduler_kwargs = t.lr_scheduler, {}
    if t.min_lr_ratio > 0 and t.lr_scheduler == "cosine":
        scheduler, scheduler_kwargs = "cosine_with_min_lr", {"min_lr_rate": t.min_lr_ratio}
    kwargs = dict(
        output_dir=str(cfg.out),
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch,
        per_device_eval_batch_size=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum or grad_accum_steps(cfg),
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN/inf loss is logged as such (NonFiniteGuard stops on it), not averaged away
        save_strategy="steps",
        save_steps=t.save_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps,
        save_total_limit=t.save_total_limit,
        bf16=t.bf16,
        activation_checkpointing=t.gradient_checkpointing,
        use_liger_kernel=liger_enabled(cfg),  # transformers' own Liger integration (fused RMSNorm/RoPE/SwiGLU/CE)
        torch_compile=t.compile,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to=curves.report_to(cfg),  # tensorboard (OUT/tensorboard) by default; recipes/curves.py
        run_name=curves.run_name(cfg),  # the run's name in W&B
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    kwargs.update(stage_kwargs)
    return args_class(**kwargs)


def lora_config(cfg, task_type: str):
    """PEFT LoRA from cfg.peft, or None. With it, DPO/RLOO use the adapter-disabled model as reference."""
    if not cfg.peft.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.peft.r,
        lora_alpha=cfg.peft.alpha,
        lora_dropout=cfg.peft.dropout,
        target_modules=list(cfg.peft.target_modules),
        task_type=task_type,
    )


def callbacks(cfg) -> list:
    """Callbacks every trainer gets: progress.json, umask modes of checkpoints and curves.png at the
    end (recipes/curves.py; first, so that the curves are drawn before a preempted run exits); on
    SIGUSR1 or the batch script's request file, save a checkpoint and stop (recipes/preemption.py;
    run_stage installs the signal handler); a non-finite loss or weights stop the stage with exit 2,
    before anything non-finite is saved (preemption.NonFiniteGuard)."""
    from recipes import preemption

    return [curves.RunObserver(cfg.out, cfg.stage), preemption.PreemptionCallback(cfg.out),
            preemption.NonFiniteGuard(cfg.out, cfg.stage)]


def dry_run(cfg) -> dict:
    """`--dry-run`: print what would run, load nothing."""
    launcher = "accelerate launch" if wants_accelerate(cfg) else "this process"
    print(to_yaml(cfg))
    print(f"{cfg.stage}: dry run, would train in {launcher} -> {cfg.out}/final")
    return {"stage": cfg.stage, "metric": "dry_run", "value": None, "wall_s": 0.0, "out": str(cfg.out)}


def preflight(cfg, *data_files: str) -> Optional[dict]:
    """Everything a stage does before it writes or loads anything: `--dry-run`, the input checks, and
    the relaunch under accelerate when several processes are asked for. Returns the summary when that
    already finished the stage here (dry run, or the processes ran), else None: go on and train."""
    if cfg.dry_run:
        return dry_run(cfg)
    check_inputs(cfg, *data_files)
    return maybe_relaunch(cfg)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def save_final(trainer, cfg, auto_class) -> Path:
    """final/: a plain transformers model and its tokenizer. LoRA adapters are merged into the base
    (the adapter itself is kept in OUT/adapter/), so downstream stages and the eval load final/ with
    auto_class.from_pretrained and need no peft."""
    final = Path(cfg.out) / "final"
    if not cfg.peft.enabled:
        trainer.save_model(str(final))  # gathers ZeRO-3 shards; also saves the tokenizer
        if trainer.accelerator.is_main_process:
            follow_umask(final)  # safetensors writes 0600
        trainer.accelerator.wait_for_everyone()
        return final
    adapter = Path(cfg.out) / "adapter"
    trainer.save_model(str(adapter))
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        from peft import PeftModel

        base = load_model(cfg, auto_class, **({"num_labels": 1} if cfg.stage in ("rm", "select") else {}))
        if cfg.stage in ("rm", "select"):
            base.config.pad_token_id = trainer.processing_class.pad_token_id
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(final))
        trainer.processing_class.save_pretrained(str(final))
        follow_umask(final)
        follow_umask(adapter)
    trainer.accelerator.wait_for_everyone()
    return final


def write_training_record(final_dir, cfg, trained_on: list[str], inputs: Optional[dict] = None, **extra) -> dict:
    """final/hs3_training.json: this stage's splits added to what its init model was trained on, the
    settings it was trained at (dtype, seq_len: the eval loads and scores it so), its inputs with content
    fingerprints (recipes.provenance.training_inputs; `inputs` adds keys to those entries, e.g. how rl's
    reward model scored), and `extra` keys (e.g. the rm's selection slice)."""
    lineage: list[str] = []
    for parent in (cfg.init, cfg.reward_model if cfg.stage == "rl" else None):
        record = Path(parent) / "hs3_training.json" if parent else None
        if record and record.is_file():
            lineage += json.loads(record.read_text())["trained_on"]
    manifest = Path(cfg.data_dir) / "manifest.json"
    record = {
        "stage": cfg.stage,
        "trained_on": list(dict.fromkeys(lineage + list(trained_on))),  # ordered, no repeats
        "data_manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
        "init": str(cfg.init) if cfg.init else str(cfg.model.path),
        "dtype": cfg.model.dtype,
        "seq_len": cfg.train.seq_len,
        **extra,
    }
    if is_main_process():
        from recipes.provenance import training_inputs

        record["inputs"] = training_inputs(cfg, inputs)  # fingerprints read files: once, on the main process
        record["versions"] = software_versions()  # the packages it ran with, vs the tested ones (constraints.txt)
        atomic_write_json(Path(final_dir) / "hs3_training.json", record)
    return record


def write_summary(cfg, metric: str, value: Optional[float], start_time: float, **extra) -> dict:
    """OUT/summary.json for the pipeline's closing table, and the stage's one-line summary.
    start_time: time.monotonic() when the stage started."""
    wall_s = time.monotonic() - start_time
    summary = {"stage": cfg.stage, "metric": metric, "value": value, "wall_s": round(wall_s, 1), "out": str(cfg.out), **extra}
    if is_main_process():
        atomic_write_json(Path(cfg.out) / "summary.json", {**summary, "versions": software_versions()})
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in extra.items())
        print(f"{cfg.stage}: {metric}={_fmt(value)} in {wall_s:.0f} s -> {cfg.out}/final" + (f" ({shown})" if shown else ""))
    return summary


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _logged(trainer, key: str) -> list[float]:
    """The logged values of `key`; steps where it had no value (None or NaN, e.g. rl's reward when every
    completion was truncated and masked) are left out."""
    values = [entry.get(key) for entry in trainer.state.log_history]
    return [v for v in values if v is not None and v == v]


def last_logged(trainer, key: str) -> Optional[float]:
    values = _logged(trainer, key)
    return values[-1] if values else None


def mean_logged(trainer, key: str) -> Optional[float]:
    values = _logged(trainer, key)
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# Several processes: re-exec the stage under `accelerate launch`
# ---------------------------------------------------------------------------------------------
def wants_accelerate(cfg) -> bool:
    return (cfg.hf.num_processes > 1 or cfg.hf.accelerate_config is not None) and os.environ.get(CHILD_ENV) != "1"


def accelerate_command(
    config_file: str | os.PathLike,
    num_processes: int,
    accelerate_config: Optional[str] = None,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: Optional[str] = None,
    main_process_port: Optional[int] = None,
    multi_gpu: bool = False,
) -> list[str]:
    """`accelerate launch ... -m recipes.training CONFIG_FILE`: every process runs the stage whose resolved
    config is CONFIG_FILE. num_processes is per machine (accelerate itself wants the total).

    multi_gpu: one process per GPU, on GPU nodes, without an accelerate config. accelerate only picks its
    distributed launcher by itself when the node sees more than one GPU (accelerate/commands/launch.py,
    _validate_launch_command: `args.multi_gpu = True` only for device_count() > 1; else simple_launcher,
    which ignores --num_machines), so nodes with one GPU each would train as independent jobs."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        command += ["--config_file", str(REPO_ROOT / accelerate_config if not Path(accelerate_config).is_absolute() else accelerate_config)]
    elif multi_gpu:
        command += ["--multi_gpu"]
    command += ["--num_processes", str(num_processes * num_machines), "--num_machines", str(num_machines)]
    if num_machines > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", str(main_process_ip)]
    if main_process_port:
        command += ["--main_process_port", str(main_process_port)]
    return command + ["-m", "recipes.training", str(config_file)]


def relaunch_under_accelerate(
    cfg,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: Optional[str] = None,
    main_process_port: Optional[int] = None,
) -> int:
    """Run this stage in cfg.hf.num_processes processes per machine under accelerate; returns the exit code.
    The resolved config travels as a file beside OUT (on the shared file system) so every process, on
    every machine, runs exactly the same config."""
    from hs3.io import UserError

    if cfg.hf.accelerate_config and not (REPO_ROOT / cfg.hf.accelerate_config).is_file() and not Path(cfg.hf.accelerate_config).is_file():
        raise ConfigError(f"hf.accelerate_config={cfg.hf.accelerate_config}: no such file")
    config_file = Path(cfg.out).parent / f".{Path(cfg.out).name}.launch.yaml"
    atomic_write_text(config_file, to_yaml(cfg))
    command = accelerate_command(
        config_file, cfg.hf.num_processes, cfg.hf.accelerate_config,
        num_machines, machine_rank, main_process_ip, main_process_port,
    )
    print(f"[{cfg.stage}] {' '.join(command)}", file=sys.stderr, flush=True)
    code = subprocess.call(command, cwd=REPO_ROOT, env={**os.environ, CHILD_ENV: "1"})
    if code != 0:
        raise UserError(f"{cfg.stage}: accelerate launch exited with {code} (see the output above)")
    return code


def maybe_relaunch(cfg) -> Optional[dict]:
    """When cfg asks for several processes and we are not one of them yet: run them, return the summary."""
    if not wants_accelerate(cfg):
        return None
    relaunch_under_accelerate(cfg)
    return json.loads((Path(cfg.out) / "summary.json").read_text())


def load_resolved_config(path: str | os.PathLike):
    """A config written by to_yaml, re-typed against the schema and re-validated."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), load_yaml(path))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).strip().splitlines()[0]}") from None
    validate(cfg)
    return cfg


# Training stages on the HF engine: what each accelerate process runs (`python -m recipes.training CONFIG`).
HF_RUNNERS = {"sft": "recipes.sft", "rm": "recipes.rm", "rl": "recipes.rl", "dpo": "recipes.dpo",
              "feedback": "recipes.feedback", "select": "recipes.select"}


def main(argv: list[str]) -> int:
    """`python -m recipes.training CONFIG.yaml`: one process of a stage started by accelerate."""
    import importlib

    from recipes import preemption

    if len(argv) != 1:
        raise SystemExit("usage: python -m recipes.training RESOLVED_CONFIG.yaml")
    cfg = load_resolved_config(argv[0])
    if cfg.stage not in HF_RUNNERS or cfg.engine != "hf":
        raise SystemExit(f"python -m recipes.training runs the HF engine's training stages, not {cfg.stage} on {cfg.engine}")
    preemption.run_guarded(cfg, importlib.import_module(HF_RUNNERS[cfg.stage]).run)
    return 0


if __name__ == "__main__":
    from hs3.io import cli_main

    sys.exit(cli_main(main)(sys.argv[1:]))
