"""Golden tests of what the Megatron engine renders for the paper configs: Megatron-Bridge's SFT config,
NeMo-RL's rm / rl (RLOO) / dpo YAMLs, the conversion commands, and the data hand-over formats.

Megatron-Bridge field names: see each list's comment; where megatron-core (installed here) defines the
field, the test checks it against the installed class itself. NeMo-RL keys and their resolved values are
checked by NeMo-RL's own config loader over its example configs (tests/test_nemo_rl_upstream.py)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from recipes.config import ConfigError, compose
from hs3.io import UserError, read_jsonl
from recipes.megatron import bridge_sft, convert, nemo_rl
from tests.conftest import run_cli

CONVERSATION = [
    {"role": "user", "content": "Write a haiku about rain."},
    {"role": "assistant", "content": "Rain falls."},
    {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\nToo short."},
]


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for split, n in (("train", 3), ("validation", 1)):
        sft = [{"id": f"{split}{i}", "messages": CONVERSATION + [{"role": "assistant", "content": f"Rain falls, {i}."}],
                "domain": "general"} for i in range(n)]
        pairs = [{"id": f"{split}{i}/good_vs_bad", "prompt": CONVERSATION,
                  "chosen": [{"role": "assistant", "content": "good"}],
                  "rejected": [{"role": "assistant", "content": "bad"}], "kind": "good_vs_bad"} for i in range(n)]
        prompts = [{"id": f"{split}{i}", "prompt": CONVERSATION, "original_response": "Rain falls.",
                    "reference_edit": "Rain falls softly."} for i in range(n)]
        for folder, rows in (("sft", sft), ("pairs", pairs), ("prompts", prompts)):
            (data / folder).mkdir(parents=True, exist_ok=True)
            (data / folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def cfg_for(stage: str, run_dir: Path, *extra: str):
    return compose(stage, ["engine=megatron", "model=llama33_70b", f"run_dir={run_dir}", "dry_run=true", *extra])


# ---- Megatron-Bridge SFT ---------------------------------------------------------------------------

# Keys the rendered overrides may set outside megatron-core, verified in NVIDIA-NeMo/Megatron-Bridge
# v0.6.0 (51885cf132b2814188b6855c25a8588254274c2a): src/megatron/bridge/recipes/llama/h100/llama3.py
# (llama31_70b_sft_32gpu_h100_bf16_config sets model.seq_length, train.*, validation.eval_interval,
# checkpoint.save_interval, ddp.use_distributed_optimizer, rng.seed), src/megatron/bridge/recipes/common.py
# (_sft_common: checkpoint.save/load/pretrained_checkpoint, logger.log_interval/tensorboard_dir,
# tokenizer.tokenizer_model), recipes/utils/optimizer_utils.py (scheduler.lr_warmup_iters, lr_decay_iters,
# lr_decay_style, start_weight_decay, end_weight_decay), data/builders/gpt_sft.py (GPTSFTDatasetConfig fields) and data/sft_processing.py
# (ChatSFTPreprocessingConfig.loss_mode in {"assistant", "last_turn", "full"}), recipes/run_plugins.py
# (train.exit_signal_handler: checkpoint and stop on SIGTERM, the preemption path), training/config.py:444
# (train.num_epochs) and :433 (scheduler.lr_warmup_fraction, resolved against lr_decay_iters at :1630-1641),
# Megatron-LM cd4afffa megatron/training/config DistributedInitConfig (dist.distributed_timeout_minutes).
BRIDGE_KEYS = {
    "train.exit_signal_handler", "train.num_epochs", "scheduler.lr_warmup_fraction", "dist.distributed_timeout_minutes",
    "model.seq_length", "train.train_iters", "train.global_batch_size", "train.micro_batch_size",
    "validation.eval_interval", "checkpoint.pretrained_checkpoint", "checkpoint.save", "checkpoint.load",
    "checkpoint.save_interval", "logger.log_interval", "logger.tensorboard_dir", "rng.seed",
    "tokenizer.tokenizer_model", "scheduler.lr_warmup_iters", "scheduler.lr_decay_iters", "scheduler.lr_decay_style",
    "scheduler.start_weight_decay", "scheduler.end_weight_decay",
}
GPT_SFT_DATASET_FIELDS = {"dataset_root", "seq_length", "preprocessing", "do_validation", "do_test",
                          "enable_offline_packing", "offline_packing_specs", "dataset_kwargs", "seed", "dataloader_type"}
# data/packing/config.py PackedSequenceSpecs; recipes/utils/dataset_utils.py passes pad_to_max_length with packing.
PACKING_SPEC_FIELDS = {"packed_sequence_size", "pad_seq_to_mult"}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_sft_config_golden(run_dir: Path):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = cfg_for("sft", run_dir, "train.lr=5e-6", "train.epochs=2", "gbs=2", "train.weight_decay=0.01")
    files = bridge_sft.render(cfg)
    doc = yaml.safe_load(files[str(bridge_sft.config_path(cfg))])
    assert doc["recipe"] == "llama31_70b_sft_config"
    assert doc["hf_model_id"] == "meta-llama/Llama-3.3-70B-Instruct"
    assert doc["megatron_bridge"]["commit"] == "51885cf132b2814188b6855c25a8588254274c2a"
    assert doc["dataset"]["preprocessing"] == {"loss_mode": "last_turn"}
    assert set(doc["dataset"]) <= GPT_SFT_DATASET_FIELDS
    packing = "offline_packing_specs" in doc["dataset"]
    assert doc["dataset"]["enable_offline_packing"] is packing is cfg.train.packing
    overrides = dict(line.split("=", 1) for line in doc["overrides"])
    # epochs, not iterations: Megatron-Bridge counts the built (packed) dataset (config.py:1586-1593)
    expected = {"model.tensor_model_parallel_size": "8", "model.pipeline_model_parallel_size": "4",
                "model.virtual_pipeline_model_parallel_size": "null", "model.context_parallel_size": "1",
                "model.sequence_parallel": "false", "model.seq_length": "4096", "train.train_iters": "null",
                "train.num_epochs": "2.0", "scheduler.lr_warmup_iters": "0", "scheduler.lr_warmup_fraction": "0.03",
                "train.global_batch_size": "2", "train.micro_batch_size": "1", "optimizer.lr": "5e-06",
                "optimizer.use_distributed_optimizer": "false", "scheduler.lr_decay_iters": "null",
                "optimizer.weight_decay": "0.01", "scheduler.start_weight_decay": "0.01", "scheduler.end_weight_decay": "0.01",
                "checkpoint.save": str((run_dir / "sft" / "checkpoints").resolve()),
                "checkpoint.load": str((run_dir / "sft" / "checkpoints").resolve()),
                "checkpoint.pretrained_checkpoint": str((run_dir / "import" / "converted").resolve()),
                "train.exit_signal_handler": "true"}  # SIGTERM on preemption: checkpoint, stop
    assert {k: overrides[k] for k in expected} == expected
    # every key is a real field: megatron-core's classes here, the verified list for the rest
    # logger.* / checkpoint.*: megatron-core's LoggerConfig / CheckpointConfig from the pinned wheel (test_mb_upstream.py)
    from tests.test_mb_upstream import megatron_core_training_config
    from tests.upstream import source

    training_config = megatron_core_training_config(source("megatron_core", "wheel"))
    known = (BRIDGE_KEYS | {f"model.{f}" for f in _fields(TransformerConfig)}
             | {f"optimizer.{f}" for f in _fields(OptimizerConfig)} | {f"ddp.{f}" for f in _fields(DistributedDataParallelConfig)}
             | {f"logger.{f}" for f in _fields(training_config.LoggerConfig)}
             | {f"checkpoint.{f}" for f in _fields(training_config.CheckpointConfig)})
    assert set(overrides) - known == set()
    assert not Path(doc["dataset"]["dataset_root"]).exists()  # rendering reads and writes no data
    max_steps = yaml.safe_load(bridge_sft.render(cfg_for("sft", run_dir, "train.max_steps=7"))[str(bridge_sft.config_path(cfg))])
    assert {"train.train_iters=7", "train.num_epochs=null"} <= set(max_steps["overrides"])
    # in the job, rank 0 writes the layout GPTSFTChatDataset reads: DATASET_ROOT/{training,validation}.jsonl
    packed: list[dict] = []  # Megatron-Bridge's packing step itself needs the container (test_megatron_chain.py)
    assert bridge_sft.prepare_data(doc, pack=packed.append) == {"train": 3, "validation": 1}
    assert packed == ([doc] if packing else [])
    training = read_jsonl(Path(doc["dataset"]["dataset_root"]) / "training.jsonl")
    assert len(training) == 3 and set(training[0]) == {"messages"}
    assert training[0]["messages"][-1] == {"role": "assistant", "content": "Rain falls, 0."}
    assert len(read_jsonl(Path(doc["dataset"]["dataset_root"]) / "validation.jsonl")) == 1


@pytest.mark.parametrize("packing, cp, spec", [(True, 1, {"packed_sequence_size": 4096, "pad_seq_to_mult": 1}),
                                                (True, 2, {"packed_sequence_size": 4096, "pad_seq_to_mult": 4}),
                                                (False, 1, None)])
def test_sft_packing_follows_train_packing(run_dir: Path, packing, cp, spec):
    cfg = cfg_for("sft", run_dir, f"train.packing={str(packing).lower()}", f"cp={cp}", f"parallel.nodes={4 * cp}")
    dataset = bridge_sft.bridge_config(cfg, rows=3)["dataset"]
    assert dataset["enable_offline_packing"] is packing
    assert dataset.get("offline_packing_specs") == spec
    if spec:
        assert set(spec) <= PACKING_SPEC_FIELDS and dataset["dataset_kwargs"] == {"pad_to_max_length": True}


def test_sft_resume_never_and_commands(run_dir: Path):
    cfg = cfg_for("sft", run_dir, "resume=never")
    doc = yaml.safe_load(bridge_sft.render(cfg)[str(bridge_sft.config_path(cfg))])
    assert "checkpoint.load=null" in doc["overrides"]
    per_rank = ["python", "-m", "recipes.megatron.bridge_sft", "--config", str(bridge_sft.config_path(cfg))]
    assert bridge_sft.build_command(cfg) == per_rank
    assert bridge_sft.local_command(cfg) == ["torchrun", "--standalone", "--nproc-per-node=8", *per_rank[1:]]
    assert (run_dir / "sft" / "command.sh").read_text().endswith(" ".join(per_rank) + "\n")
    with pytest.raises(UserError, match="the sft plan needs 4 nodes: submit it with executor=slurm"):
        bridge_sft.run(cfg_for("sft", run_dir, "dry_run=false"))


def test_package_build_command_renders_the_stage_files(run_dir: Path):
    from recipes.megatron import build_command, job_nodes

    for stage, name in (("sft", "megatron_bridge_sft.yaml"), ("rm", "nemo_rl_rm.yaml"), ("dpo", "nemo_rl_dpo.yaml")):
        cfg = cfg_for(stage, run_dir)
        command = build_command(cfg)
        assert command[-1] == str((run_dir / stage / name).resolve()) and Path(command[-1]).is_file()
        assert (run_dir / stage / "command.sh").is_file()
    assert job_nodes(cfg_for("rl", run_dir)) == (9, 8)


def test_sft_rejects_data_without_a_final_assistant_turn(run_dir: Path):
    (run_dir / "data" / "sft" / "train.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    cfg = cfg_for("sft", run_dir)
    doc = yaml.safe_load(bridge_sft.render(cfg)[str(bridge_sft.config_path(cfg))])
    with pytest.raises(UserError, match="line 1: `messages` must end with the assistant turn"):
        bridge_sft.prepare_data(doc)
    assert not bridge_sft.prepared_marker(doc).exists()  # the other ranks keep waiting; srun ends them


def test_sft_dry_run_cli_prints_config_and_command(run_dir: Path):
    ok = run_cli("-m", "launcher", "sft", "engine=megatron", "model=llama33_70b", f"run_dir={run_dir}", "--dry-run", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "recipe: llama31_70b_sft_config" in ok.stdout
    assert "command (one per GPU): python -m recipes.megatron.bridge_sft --config" in ok.stdout
    assert (run_dir / "sft" / "megatron_bridge_sft.yaml").is_file()
    bad = run_cli("-m", "launcher", "sft", "engine=megatron", "model=llama33_70b", f"run_dir={run_dir}", "pp=3", "--dry-run", timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: world 4x8 = 32 GPUs is not divisible by TP 8 x PP 3 x CP 1 = 24"


# ---- NeMo-RL ----------------------------------------------------------------------------------------
# Which keys exist upstream and what they resolve to is checked by NeMo-RL's own loader over its own
# example configs (tests/test_nemo_rl_upstream.py); these tests check what each stage renders.

def rendered(stage: str, run_dir: Path, *extra: str) -> tuple[object, dict]:
    """The NeMo-RL YAML as the job runs it: the data hand-over written, the YAML re-rendered with its rows."""
    cfg = cfg_for(stage, run_dir, *extra)
    nemo_rl.render(cfg)
    nemo_rl.prepare(cfg)
    return cfg, yaml.safe_load(nemo_rl.config_path(cfg).read_text())


@pytest.fixture()
def init_model(run_dir: Path, tiny_model_dir) -> Path:
    """RUN/sft/final: the stages' init model (its tokenizer counts tokens in the job)."""
    import shutil

    shutil.copytree(tiny_model_dir, run_dir / "sft" / "final")
    return run_dir / "sft" / "final"


def test_rm_is_bradley_terry_on_dtensor_with_preference_data(run_dir: Path, init_model):
    # all pairs of this fixture share one prompt: no slice can be held out, so no validation at all
    cfg, doc = rendered("rm", run_dir, "rm.selection_fraction=0", "rm.keep_best=false")
    assert (doc["rm"]["val_period"], doc["rm"]["val_at_end"], doc["data"]["validation"]) == (0, False, None)
    assert doc["checkpointing"]["metric_name"] is None and not nemo_rl.data_path(cfg, "validation").exists()
    assert doc["policy"]["reward_model_cfg"] == {"enabled": True, "reward_model_type": "bradley_terry"}
    assert doc["policy"]["megatron_cfg"] == {"enabled": False}
    assert doc["policy"]["dtensor_cfg"]["tensor_parallel_size"] == 1 and doc["policy"]["dtensor_cfg"]["_v2"] is False
    assert doc["data"]["train"]["dataset_name"] == "PreferenceDataset"
    row = read_jsonl(doc["data"]["train"]["data_path"])[0]
    assert row == {"context": CONVERSATION, "completions": [
        {"rank": 0, "completion": [{"role": "assistant", "content": "good"}]},
        {"rank": 1, "completion": [{"role": "assistant", "content": "bad"}]}]}
    assert nemo_rl.build_command(cfg)[:7] == ["python", "-m", "recipes.megatron.nemo_rl", "--stage-config",
                                              str(run_dir.resolve() / "rm" / "config.yaml"), "--entry",
                                              "/opt/nemo-rl/examples/run_rm.py"]
    with pytest.raises(ConfigError, match="needs parallel.fsdp=true and pp=1"):
        nemo_rl.nemo_rl_config(cfg_for("rm", run_dir, "parallel.fsdp=false"))


def test_rl_is_rloo_with_the_reward_model_environment(run_dir: Path, init_model):
    cfg, doc = rendered("rl", run_dir, "rl.k=6", "rl.kl_coef=0.02", "rl.prompts_per_step=16", "gbs=96",
                        f"rm={run_dir / 'rm' / 'final'}")
    grpo = doc["grpo"]
    assert (grpo["use_leave_one_out_baseline"], grpo["normalize_rewards"]) == (True, False)
    assert (grpo["num_generations_per_prompt"], grpo["num_prompts_per_step"]) == (6, 16)
    assert doc["loss_fn"] == {"reference_policy_kl_penalty": 0.02}
    assert doc["policy"]["generation"]["backend"] == "vllm"
    assert doc["policy"]["megatron_cfg"]["tensor_model_parallel_size"] == 4
    env = doc["env"]["reward_model"]
    assert env["model_name"] == str((run_dir / "rm" / "final").resolve())
    # reward_model_environment.py asserts each of these at start-up
    assert env["reward_model_cfg"] == {"enabled": True, "reward_model_type": "bradley_terry"}
    assert not env["dynamic_batching"]["enabled"] and not env["sequence_packing"]["enabled"]
    assert env["dtensor_cfg"]["enabled"] and env["dtensor_cfg"]["_v2"] and not env["dtensor_cfg"]["cpu_offload"]
    assert not env["dtensor_cfg"]["activation_checkpointing"] and env["max_grad_norm"] is None
    # policy nodes = cluster nodes - reward-model nodes, as NeMo-RL's grpo setup computes them
    assert doc["cluster"]["num_nodes"] - env["resources"]["num_nodes"] == 8
    assert doc["data"]["default"] == {"dataset_name": "ResponseDataset", "processor": "hs3_edit_prompt",
                                      "env_name": "reward_model", "prompt_file": None, "system_prompt_file": None}
    row = read_jsonl(doc["data"]["train"]["data_path"])[0]
    assert row == {"messages": CONVERSATION, "reference_edit": "Rain falls softly."}
    # the policy is handed over by content (the conversion cache key: test_nemo_rl_upstream.py)
    assert Path(doc["policy"]["model_name"]).parent == run_dir.resolve() / "rl" / "policy_source"
    assert Path(doc["policy"]["model_name"]).resolve() == init_model.resolve()
    assert nemo_rl.build_command(cfg)[5:7] == ["--entry", "/opt/nemo-rl/examples/run_grpo.py"]
    one_node = nemo_rl.nemo_rl_config(cfg_for("rl", run_dir, "parallel.nodes=1", "tp=1", "pp=1", "gbs=8", "mbs=1"))
    assert one_node["env"]["reward_model"]["resources"] == {"gpus_per_node": 1, "num_nodes": 1}
    assert one_node["env"]["reward_model"]["dtensor_cfg"]["tensor_parallel_size"] == 1


def test_dpo_uses_a_megatron_policy_and_beta(run_dir: Path, init_model):
    _, doc = rendered("dpo", run_dir, "dpo.beta=0.2")
    assert doc["dpo"]["reference_policy_kl_penalty"] == 0.2
    assert doc["policy"]["dtensor_cfg"] == {"enabled": False}
    assert doc["policy"]["optimizer"] is None and doc["policy"]["scheduler"] is None
    assert doc["policy"]["megatron_cfg"]["pipeline_model_parallel_size"] == 4
    # dpo.yaml stage: cosine, warmup 3% of 1 epoch of 3 pairs at global batch 128 = 1 step (rm.yaml:124-131 keys)
    assert doc["policy"]["megatron_cfg"]["scheduler"] == {"lr_decay_style": "cosine", "lr_warmup_iters": 0, "lr_decay_iters": 1}
    with pytest.raises(ConfigError, match="train.lr_scheduler=polynomial"):
        nemo_rl.nemo_rl_config(cfg_for("dpo", run_dir, "train.lr_scheduler=polynomial"))


def test_keys_nemo_rl_cannot_honour_are_refused_not_ignored(run_dir: Path):
    """Stage keys engine=hf honours and NeMo-RL v0.7.0 has no counterpart for: a one-line error, never a
    silently different run."""
    with pytest.raises(ConfigError, match=r"dpo.loss_type=ipo: NeMo-RL v0.7.0's DPO has the sigmoid"):
        nemo_rl.nemo_rl_config(cfg_for("dpo", run_dir, "dpo.loss_type=ipo"), rows=100)
    with pytest.raises(ConfigError, match="rm.center_rewards_coefficient: engine=hf only"):
        nemo_rl.nemo_rl_config(cfg_for("rm", run_dir, "rm.center_rewards_coefficient=0.01"), rows=100)


def test_fractional_epochs_and_max_steps_bound_nemo_rl_exactly(run_dir: Path):
    """NeMo-RL stops at min(max_num_steps, max_num_epochs x full batches): both are set, so half an epoch
    is half an epoch (it was rounded to 1) and train.max_steps may run past one epoch."""
    half = nemo_rl.nemo_rl_config(cfg_for("dpo", run_dir, "train.epochs=0.5"), rows=1280)["dpo"]
    assert (half["max_num_steps"], half["max_num_epochs"]) == (5, 1)
    more = nemo_rl.nemo_rl_config(cfg_for("rm", run_dir, "train.max_steps=25"), rows=1280)["rm"]
    assert (more["max_num_steps"], more["max_num_epochs"]) == (25, 3)


# ---- conversion -------------------------------------------------------------------------------------

def test_convert_commands(run_dir: Path):
    """Megatron-Bridge's conversion worker, called with python: convert.sh would wrap it in
    `uv run --with nemo-run==0.10.0` (convert.sh:45-56), which needs a package index on the node."""
    cfg = compose("convert", ["engine=megatron", "model=llama33_70b", f"run_dir={run_dir}"])
    dest = str((run_dir / "convert" / "converted").resolve())
    worker = "/opt/Megatron-Bridge/scripts/conversion/run_conversion.py"  # its argparse: arguments.py:147-256
    assert convert.build_command(cfg) == [
        "python", worker, "import", "--device", "cpu", "--hf-model", "meta-llama/Llama-3.3-70B-Instruct", "--megatron-path", dest]
    ckpt = run_dir / "sft" / "checkpoints"
    cfg = compose("convert", ["engine=megatron", "model=llama33_70b", f"run_dir={run_dir}", f"init={ckpt}",
                              "megatron.convert_direction=megatron_to_hf", "megatron.convert_device=gpu",
                              f"megatron.convert_dest={run_dir}/sft/final"])
    assert convert.build_command(cfg) == [
        "torchrun", "--standalone", "--nproc-per-node=8", worker, "export", "--device", "gpu",
        "--hf-model", "meta-llama/Llama-3.3-70B-Instruct", "--megatron-path", str(ckpt.resolve()),
        "--hf-path", str((run_dir / "sft" / "final").resolve())]
    cfg = compose("convert", ["engine=megatron", f"run_dir={run_dir}", f"init={run_dir}/rm/checkpoints",
                              "megatron.convert_direction=nemo_rl_to_hf", "megatron.convert_select=best"])
    assert convert.build_command(cfg) == [
        "python", "-m", "recipes.megatron.convert", "--checkpoints", str((run_dir / "rm" / "checkpoints").resolve()),
        "--dest", str((run_dir / "convert" / "converted").resolve()), "--converters", "/opt/nemo-rl/examples/converters",
        "--select", "best"]
    with pytest.raises(ConfigError, match="convert_direction=sideways"):
        convert.build_command(compose("convert", ["engine=megatron", "megatron.convert_direction=sideways"]))
    with pytest.raises(ConfigError, match="must not be the stage's output dir"):
        convert.build_command(compose("convert", ["engine=megatron", f"run_dir={run_dir}", f"megatron.convert_dest={run_dir}"]))
