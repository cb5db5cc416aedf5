"""GPU checks of the Megatron engine, for a machine with NVIDIA GPUs and the pinned containers
(tests/gpu/run_gpu_checks.sh runs each test in its container). Everywhere else they skip, saying why.

  * a tiny Llama through Megatron-Bridge: HF -> Megatron conversion (AutoBridge), then sft at TP1 PP1
    for two iterations with our rendered config, then Megatron -> HF export;
  * one NeMo-RL RLOO step (GRPO + leave-one-out baseline) with a tiny policy and a tiny Bradley-Terry
    reward model through NeMo-RL's reward-model environment (2 GPUs: policy + reward model).

Paths of the pinned checkouts inside the containers: MEGATRON_BRIDGE_DIR (default /opt/Megatron-Bridge)
and NEMO_RL_DIR (default /opt/nemo-rl).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

CONVERSATION = [
    {"role": "user", "content": "Write a haiku about rain."},
    {"role": "assistant", "content": "Rain falls."},
    {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\nToo short."},
]


def require(module: str, gpus: int = 1) -> None:
    try:
        import torch
    except ImportError:
        pytest.skip("needs torch with CUDA")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run tests/gpu/run_gpu_checks.sh on a GPU node")
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs, found {torch.cuda.device_count()}")
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        pytest.skip(f"needs {module}: run inside the pinned container (tests/gpu/run_gpu_checks.sh)")


def write_data(data: Path) -> None:
    for split, n in (("train", 8), ("validation", 2)):
        rows = {
            "sft": [{"id": f"{split}{i}", "messages": CONVERSATION + [{"role": "assistant", "content": f"Rain falls softly, {i}."}]}
                    for i in range(n)],
            "prompts": [{"id": f"{split}{i}", "prompt": CONVERSATION, "original_response": "Rain falls.",
                         "reference_edit": "Rain falls softly."} for i in range(n)],
        }
        for folder, lines in rows.items():
            (data / folder).mkdir(parents=True, exist_ok=True)
            (data / folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def tiny_models(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny causal LM (with our Llama-3-format tokenizer) and a tiny one-output reward model from it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes.config import compose
    from recipes.tiny_model import build_tiny_model

    policy = build_tiny_model(compose("sft", []).model, tmp_path / "tiny-policy")
    reward = tmp_path / "tiny-rm"
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    return Path(policy), reward


def test_tiny_llama_megatron_bridge_sft_tp1_pp1(tmp_path: Path):
    require("megatron.bridge")
    from recipes.config import compose
    from recipes.megatron import bridge_sft, convert

    policy, _ = tiny_models(tmp_path)
    write_data(tmp_path / "data")
    bridge_dir = os.environ.get("MEGATRON_BRIDGE_DIR", "/opt/Megatron-Bridge")
    common = ["engine=megatron", "model=tiny", f"run_dir={tmp_path}", f"megatron.hf_model_id={policy}",
              f"megatron.megatron_bridge_dir={bridge_dir}", "parallel.nodes=1", "parallel.gpus_per_node=1"]
    # the megatron chain's import -> sft -> sft_export (conf/pipeline/megatron.yaml), each as its own stage run
    convert.run(compose("convert", [*common, f"init={policy}", "name=import", f"out={tmp_path / 'import'}"]))
    assert (tmp_path / "import" / "summary.json").is_file() and (tmp_path / "import" / "converted").is_dir()

    sft = compose("sft", [*common, "tp=1", "pp=1", "vpp=null", "cp=1", "sp=false", "train.max_steps=2", "train.seq_len=256",
                          "gbs=2", "mbs=1", "train.save_steps=2", "train.eval_steps=2", "train.lr=1e-4"])
    bridge_sft.run(sft)
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["value"] == 2
    assert sorted((tmp_path / "sft" / "checkpoints").glob("iter_*")), "Megatron-Bridge saved no checkpoint"

    convert.run(compose("convert", [*common, "megatron.convert_direction=megatron_to_hf", f"init={tmp_path / 'sft' / 'checkpoints'}",
                                    "name=sft_export", f"out={tmp_path / 'sft_export'}",
                                    f"megatron.convert_dest={tmp_path / 'sft' / 'final'}"]))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final").config.num_hidden_layers == 2


def test_one_nemo_rl_rloo_step_with_the_reward_model_environment(tmp_path: Path):
    require("nemo_rl", gpus=2)
    from recipes.config import compose
    from recipes.megatron import nemo_rl

    policy, reward = tiny_models(tmp_path)
    write_data(tmp_path / "data")
    cfg = compose("rl", [
        "engine=megatron", "model=tiny", f"run_dir={tmp_path}", f"init={policy}", f"rm={reward}",
        f"megatron.nemo_rl_dir={os.environ.get('NEMO_RL_DIR', '/opt/nemo-rl')}", "megatron.vllm_tp=1",
        "megatron.vllm_gpu_memory_utilization=0.3", "parallel.nodes=1", "parallel.gpus_per_node=2",
        "tp=1", "pp=1", "sp=false", "train.max_steps=1", "train.seq_len=256", "rl.k=2", "rl.prompts_per_step=2",
        "gbs=4", "mbs=1", "rl.max_new_tokens=16",
    ])
    nemo_rl.run(cfg)
    assert json.loads((tmp_path / "rl" / "summary.json").read_text())["stage"] == "rl"
    assert any((tmp_path / "rl" / "checkpoints").iterdir()), "NeMo-RL saved no checkpoint"
