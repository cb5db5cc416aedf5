"""Parallel plans: every validation rule (valid and each failure, with its numbers) and the estimates
against figures Megatron-Bridge publishes for Llama-3-70B."""
from __future__ import annotations

import dataclasses

import pytest

from recipes.config import ConfigError, compose
from recipes.megatron.plan import (
    GIB, Plan, flops_per_token, memory_per_gpu, parameter_counts, plan_from_cfg, step_seconds,
    tokens_per_second_per_gpu, validate_plan,
)
from tests.conftest import run_cli

LLAMA_70B = dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_heads=8,
                 ffn_hidden_size=28672, vocab_size=128256, tie_embeddings=False)


def plan(**changes) -> Plan:
    """Megatron-Bridge's Llama-3.1-70B SFT plan (TP8 PP4, 4 nodes x 8 GPUs), with changes."""
    base = dict(stage="sft", tp=8, pp=4, vpp=None, cp=1, sequence_parallel=False, fsdp=False, micro_batch=1,
                global_batch=128, seq_len=4096, nodes=4, gpus_per_node=8, recompute=False,
                distributed_optimizer=False, **LLAMA_70B)
    return Plan(**{**base, **changes})


@pytest.fixture(params=["megatron-core", "without megatron-core"])
def checks(request, monkeypatch):
    """Run a rule test with megatron-core's own checks and with the fallback used when it is not installed."""
    if request.param == "without megatron-core":
        import builtins

        real_import = builtins.__import__

        def no_megatron(name, *args, **kwargs):
            if name.startswith("megatron"):
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_megatron)
    return request.param


def error_of(p: Plan) -> str:
    with pytest.raises(ConfigError) as info:
        validate_plan(p)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_default_sft_plan_from_config_is_valid_and_matches_the_recipe():
    cfg = compose("sft", ["engine=megatron", "model=llama33_70b"])
    p = plan_from_cfg(cfg)
    validate_plan(p)
    assert (p.tp, p.pp, p.vpp, p.cp, p.nodes, p.gpus_per_node) == (8, 4, None, 1, 4, 8)
    assert (p.world, p.dp, p.num_microbatches, p.seq_len) == (32, 1, 128, 4096)


@pytest.mark.parametrize("stage", ["rm", "rl", "dpo"])
def test_rm_rl_dpo_plans_are_valid_and_fit_80gb(stage):
    p = plan_from_cfg(compose(stage, ["engine=megatron", "model=llama33_70b"]))
    validate_plan(p)
    assert memory_per_gpu(p)["total"] / GIB < 80


def test_rl_plan_leaves_the_reward_model_nodes_out_of_the_policy():
    cfg = compose("rl", ["engine=megatron", "model=llama33_70b", "megatron.reward_model_nodes=2"])
    assert plan_from_cfg(cfg).nodes == cfg.parallel.nodes - 2


@pytest.mark.parametrize("changes, message", [
    (dict(tp=16, nodes=8), "TP 16 > 8 GPUs per node: tensor parallelism must stay inside a node"),
    (dict(nodes=3), "world 3x8 = 24 GPUs is not divisible by TP 8 x PP 4 x CP 1 = 32"),
    (dict(pp=3, nodes=3), "80 layers are not divisible by PP 3"),
    (dict(vpp=3), "80 layers are not divisible by PP 4 x VPP 3 = 12"),
    (dict(pp=1, vpp=2, nodes=1), "VPP 2 needs pipeline parallelism (PP 1)"),
    (dict(sequence_parallel=True, seq_len=4100), "sequence length 4100 is not divisible by TP 8 (sequence parallel)"),
    (dict(cp=2, nodes=8, seq_len=4098), "sequence length 4098 is not divisible by 2 x CP 2 = 4 (context parallel)"),
    (dict(tp=4, pp=1, global_batch=100), "global batch 100 is not divisible by micro batch 1 x DP 8 (= 8)"),
    (dict(vpp=5, global_batch=6), "6 micro-batches (global batch 6 / (micro batch 1 x DP 1)) is not a multiple of PP 4"),
    (dict(fsdp=True), "PP 4 with fsdp"),
    (dict(num_attention_heads=12, num_kv_heads=4), "num_attention_heads (12) must be a multiple of tensor_model_parallel_size (8)"),
    (dict(tp=2, nodes=1, pp=1, global_batch=128, num_kv_heads=3, num_attention_heads=6),
     "num_query_groups (3) must be a multiple or divisor of tensor_model_parallel_size (2)"),
    (dict(tp=1, pp=1, nodes=1, sequence_parallel=True), "Cannot use sequence parallelism without tensor parallelism"),
    (dict(micro_batch=0), "micro_batch=0 must be >= 1"),
])
def test_each_rule_fails_with_one_line_naming_the_numbers(changes, message, checks):
    assert message in error_of(plan(**changes))


def test_rules_that_hold_pass(checks):
    validate_plan(plan(vpp=5, global_batch=8, sequence_parallel=True))  # 80 % 20 == 0, 8 micro-batches % 4 == 0
    validate_plan(plan(cp=2, nodes=8, seq_len=4096))
    validate_plan(plan(tp=8, pp=1, nodes=4, fsdp=True))


def test_plan_cli_prints_the_table_and_fails_in_one_line():
    ok = run_cli("-m", "launcher", "plan", "model=llama33_70b", "nodes=4", timeout=120)
    assert ok.returncode == 0, ok.stderr
    for label in ("TP / PP / VPP / CP", "DP", "micro-batches per step", "memory per GPU: total", "tokens per step",
                  "estimated stage hours"):
        assert label in ok.stdout
    assert "524,288" in ok.stdout  # 128 x 4096 tokens per step
    bad = run_cli("-m", "launcher", "plan", "model=llama33_70b", "nodes=3", timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: world 3x8 = 24 GPUs is not divisible by TP 8 x PP 4 x CP 1 = 32"
    vpp = run_cli("-m", "launcher", "plan", "model=llama33_70b", "vpp=3", timeout=120)
    assert vpp.returncode == 2 and vpp.stderr.strip().endswith("80 layers are not divisible by PP 4 x VPP 3 = 12")


# ---- estimates vs published figures -------------------------------------------------------------

def test_parameter_count_matches_the_published_70_6b():
    # Meta's Llama-3.3-70B-Instruct model card: 70.6B parameters (Llama-3.1-70B: 70.6B). Tolerance 0.5%.
    assert parameter_counts(plan())["total"] == pytest.approx(70.6e9, rel=0.005)


@pytest.mark.parametrize("seq_len, tflops, tokens_per_s", [
    # Megatron-Bridge docs/performance-summary-archive.md (commit 067f987df03b8355b03192d88d70f1709fedf51a):
    # "26.06 NeMo Container / SFT Performance / LLAMA3_70B": DGX-H100, 32 GPUs, GBS 32, MBS 1, seq 4096,
    # TP4 PP4 VP5: 1638 tokens/s/GPU, 710 model TFLOP/s/GPU.
    (4096, 710, 1638),
    # Same file, "26.04 NeMo Container / Pre-Training / LLAMA3_70B": DGX-H100, 64 GPUs, seq 8192,
    # TP4 PP8 VP5: 1633 tokens/s/GPU, 734 model TFLOP/s/GPU.
    (8192, 734, 1633),
])
def test_flops_per_token_match_megatron_bridge_published_throughput(seq_len, tflops, tokens_per_s):
    p = plan(seq_len=seq_len)
    # Their table's TFLOP/s divided by its tokens/s is their FLOPs per token; ours within 3%.
    assert flops_per_token(p) == pytest.approx(tflops * 1e12 / tokens_per_s, rel=0.03)
    assert tokens_per_second_per_gpu(p, achieved_tflops=tflops) == pytest.approx(tokens_per_s, rel=0.03)


def test_step_time_follows_the_mfu():
    p = plan()
    faster = dataclasses.replace(p, mfu=p.mfu * 2)
    assert step_seconds(faster) == pytest.approx(step_seconds(p) / 2)
    # tokens/step / step time / GPUs = achieved TFLOP/s / FLOPs per token
    achieved = p.mfu * p.peak_tflops
    assert p.tokens_per_step / step_seconds(p) / p.world == pytest.approx(tokens_per_second_per_gpu(p, achieved))


def test_model_state_bytes_follow_megatron_bridges_published_byte_model():
    # Megatron-Bridge docs/training/memory-estimator.md: 18 bytes/parameter without the distributed
    # optimizer, 6 + 12/shard with it (shard = DP x CP), on the most loaded shard.
    for distributed, p in ((False, plan()), (True, plan(distributed_optimizer=True, tp=4, pp=4, nodes=8))):
        m = memory_per_gpu(p)
        state = m["weights"] + m["grads"] + m["optimizer"]
        per_param = 6 + 12 / (p.dp * p.cp) if distributed else 18
        assert state == pytest.approx(per_param * m["params"])
    # Most loaded shard = first stage: 20 of 80 layers plus the input embedding, over TP 8.
    counts = parameter_counts(plan())
    assert memory_per_gpu(plan())["params"] == pytest.approx((counts["per_layer"] * 20 + counts["embedding"]) / 8)


def test_activation_estimates_respond_to_recompute_sp_vpp_and_cp():
    base = memory_per_gpu(plan(sequence_parallel=True))["activations"]
    # Megatron-Bridge theoretical_memory_utils: s*b*h*(18 + 4*ffn/h) per layer / TP, PP micro-batches in flight
    # on the first stage (= all 80 layers' worth), plus embedding input and dropout.
    s, b, h = 4096, 1, 8192
    expected = (s * b * h * (18 + 4 * 28672 / h) * 80 + (8 * s * b + s * b * h) * 4) / 8
    assert base == pytest.approx(expected)
    assert memory_per_gpu(plan(sequence_parallel=True, recompute=True))["activations"] < base / 10
    assert memory_per_gpu(plan(sequence_parallel=False))["activations"] > base
    interleaved = memory_per_gpu(plan(sequence_parallel=True, vpp=5))["activations"]
    assert interleaved == pytest.approx(base * (1 + 3 / 20))
    assert memory_per_gpu(plan(sequence_parallel=True, cp=2, nodes=8))["activations"] == pytest.approx(base / 2)


def test_distributed_optimizer_shards_the_optimizer_state():
    plain = memory_per_gpu(plan(tp=4, pp=4, nodes=8))["optimizer"]
    sharded = memory_per_gpu(plan(tp=4, pp=4, nodes=8, distributed_optimizer=True))["optimizer"]
    assert sharded == pytest.approx(plain / 4)  # DP 4


def test_stage_steps_count_rows_or_prompts(tmp_path):
    from recipes.megatron.plan import stage_steps

    prompts = tmp_path / "data" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "train.jsonl").write_text('{"id": 1}\n' * 100)
    rl = compose("rl", ["engine=megatron", "model=llama33_70b", f"run_dir={tmp_path}"])
    # 100 prompts / 32 per step: NeMo-RL drops the last partial batch (grpo.py:363), so 3 steps
    assert stage_steps(rl, plan_from_cfg(rl)) == (3, f"100 rows in {prompts / 'train.jsonl'}")
    sft = compose("sft", ["engine=megatron", "model=llama33_70b", f"run_dir={tmp_path}", "megatron.plan_samples=1000"])
    assert stage_steps(sft, plan_from_cfg(sft))[0] == 8  # 1000 rows / 128, rounded up
    assert stage_steps(compose("sft", ["engine=megatron", "model=llama33_70b", "train.max_steps=5"]), plan())[0] == 5


# ---- NeMo-RL stages: what its DTensor worker refuses, generation, start-up ----------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(stage="rm", fsdp=True, pp=1, tp=8, sequence_parallel=True),
     "sequence_parallel with TP 8: the reward model (LlamaForSequenceClassification) has no optimised TP plan"),
    (dict(stage="rm", fsdp=True, pp=1, tp=8, num_kv_heads=4, num_attention_heads=64),
     "num_kv_heads (4) must be divisible by TP 8 (parallelize.py:665-671)"),
    (dict(stage="dpo", fsdp=True, pp=1, tp=2, cp=2, nodes=4, sequence_parallel=True),
     "context parallel with sequence parallel is refused (dtensor_policy_worker.py:370-374)"),
])
def test_dtensor_plans_nemo_rl_refuses_fail_in_one_line(changes, message):
    """Rules of NeMo-RL's DTensor v1 worker that megatron-core does not have (megatron-core allows 4 KV
    heads on TP 8, and SP with TP); the rm case with its real dispatch: tests/test_nemo_rl_upstream.py."""
    assert message in error_of(plan(**changes))
    validate_plan(plan(stage="rm", fsdp=True, pp=1, tp=1))  # the rm plan: FSDP only
    validate_plan(plan(stage="rm", fsdp=True, pp=1, tp=8))  # TP without SP: NeMo-RL's HF-plan fallback


def test_rl_hours_include_generation_at_a_stated_assumption():
    """`plan stage=rl` counted training FLOPs only; a step also generates every rollout (vLLM), computes
    the old policy's and the reference's log-probs and scores with the reward model."""
    from recipes.megatron.plan import stage_step_seconds

    cfg = compose("rl", ["engine=megatron", "model=llama33_70b"])
    p = plan_from_cfg(cfg)
    parts = stage_step_seconds(cfg, p)
    assert parts["training"] == pytest.approx(step_seconds(p))
    assert parts["generation (assumed)"] == pytest.approx(2048 / 40)  # rl.max_new_tokens / vllm_decode_tokens_per_s
    assert parts["log-probs (old policy, reference)"] == pytest.approx(2 / 3 * step_seconds(p))
    assert parts["reward model"] > 0 and sum(parts.values()) > 2 * step_seconds(p)
    slower = compose("rl", ["engine=megatron", "model=llama33_70b", "megatron.vllm_decode_tokens_per_s=20"])
    assert stage_step_seconds(slower, p)["generation (assumed)"] == pytest.approx(2 * parts["generation (assumed)"])
    out = run_cli("-m", "launcher", "plan", "stage=rl", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "generation (assumed)" in out.stdout and "megatron.vllm_decode_tokens_per_s=40 tokens/s per sequence" in out.stdout
    assert "rl hours include generation, an assumption" in out.stdout
    sft = run_cli("-m", "launcher", "plan", "stage=sft", timeout=120)
    assert "hours count compute only" in sft.stdout


def test_nemo_rl_start_up_allowance_covers_conversion_and_loading():
    """Finding 9: 20 minutes of start-up for every NeMo-RL stage ended a first 70B rl launch (HF->Megatron
    conversion, policy, reference, vLLM and reward model loads) in TIMEOUT, which SLURM does not requeue.
    Derived now from the model's size and each stage's weight copies; an explicit value wins."""
    from recipes.megatron.nemo_rl import setup_seconds

    minutes = {stage: setup_seconds(compose(stage, ["engine=megatron", "model=llama33_70b"])) / 60 for stage in ("rm", "dpo", "rl")}
    assert minutes["rl"] > minutes["dpo"] > minutes["rm"] and minutes["rl"] >= 40
    assert setup_seconds(compose("rl", ["engine=megatron", "model=llama33_70b"]), converts=False) < 60 * minutes["rl"]
    assert setup_seconds(compose("rl", ["engine=megatron", "model=llama33_70b", "megatron.setup_minutes=25"])) == 25 * 60
    assert setup_seconds(compose("rl", ["engine=megatron", "model=tiny"])) < setup_seconds(compose("rl", ["engine=megatron", "model=llama33_70b"]))
