"""GPU measurements behind benchmarks/gpu_checks.sh (one subcommand per check; each prints JSON lines).

    python3 benchmarks/gpu_bench.py matmul                        # measured bf16 peak: 8192^3 matmul
    python3 benchmarks/gpu_bench.py sft [--shape 1b|slice] [--packing on|off] [--attention sdpa|flex_attention|...]
                                        [--liger] [--compile]     # our HF engine's model and kernels, bf16
    python3 benchmarks/gpu_bench.py megatron --shape slice        # megatron-core GPTModel (local spec), same rows
    python3 benchmarks/gpu_bench.py megatron                      # megatron-core trains our tiny Llama shape
    python3 benchmarks/gpu_bench.py generate [--cache dynamic|static]   # eval.engines.HFEngine, one cache kind
    python3 benchmarks/gpu_bench.py rl_vllm                       # probe: TRL's vLLM path needs vllm (absent: says so)

`--small` shrinks every model and shape so the script itself can be checked on a CPU before device
time is spent on it (`SMALL=1 bash benchmarks/gpu_checks.sh`; the figures are then meaningless).

Shapes (seq 4096, packed rows, bf16 autocast over fp32 weights, fused AdamW):
  1b     a ~1.2B Llama (hidden 2048, 16 layers, 16 heads, 8 KV heads, FFN 5504, vocab 128,256)
  slice  a Llama-3.3-70B-shaped slice: hidden 8192, 64 heads, 8 KV heads, FFN 28672, vocab 128,256, 2 layers
sft: MFU = 6 x N x trained tokens/s / peak, N = the parameters that do matrix work (all but the input
embedding, whose lookup is no FLOP; the output layer counts). Attention score FLOPs are not counted (the
same for every contender here; at seq 4096 they add ~10-15% on the 1b shape). Trained tokens = real
(non-pad) tokens. Rows are synthetic: lengths drawn once (seeded) from seq/16..3*seq/4 tokens, the same
rows for every contender. Packed: rows concatenated best-fit-decreasing into seq-token packs with
position_ids restarting per row and no attention mask: transformers builds the mask from the position_ids,
a dense block-diagonal one for sdpa/eager, a document block mask for flex_attention, cu_seqlens for
flash_attention_2 (recipes.training.attention_implementation picks flex_attention for packed rows on CUDA).
--liger applies Liger's kernels the way transformers' Trainer does for train.liger (fused RMSNorm, RoPE,
SwiGLU, linear cross-entropy); --compile wraps the model in torch.compile as train.compile does.
megatron --shape slice: megatron-core's GPTModel with its local layer spec (no Transformer Engine: unfused
attention with a dense mask; the same block-diagonal mask is passed, RoPE positions run over the pack
since GPTModel takes RoPE positions from packed_seq_params, which needs Transformer Engine), the same
packs, loss on the same labels, the same optimizer: the matrix work is identical, so MFU compares them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cmd_matmul(args) -> None:
    import torch

    n = 1024 if args.small else 8192
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    reps = 2 if args.small else 20
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    seconds = (time.perf_counter() - start) / reps
    emit(check="matmul", n=n, tflops=2 * n ** 3 / seconds / 1e12)


SHAPES = {
    # ~1.2B Llama at seq 4096 (the last round's figures: 14.5% MFU packed)
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=8),
    # Llama-3.3-70B's layer and vocabulary, 2 layers
    "slice": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2, num_attention_heads=64,
                  num_key_value_heads=8),
}
SMALL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1)


def llama_config(args, vocab: int):
    from transformers import LlamaConfig

    shape = SMALL_SHAPE if args.small else SHAPES[getattr(args, "shape", "1b")]
    return LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, rope_theta=500000.0, **shape)


def seq_len(args) -> int:
    return 256 if args.small else 4096


def synthetic_rows(count: int, low: int, high: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def pack_bfd(rows: list[list[int]], capacity: int) -> list[list[list[int]]]:
    """Best-fit decreasing: each row (longest first) goes into the fullest pack it still fits in."""
    packs: list[list[list[int]]] = []
    room: list[int] = []
    for row in sorted(rows, key=len, reverse=True):
        best = min((i for i, r in enumerate(room) if r >= len(row)), key=lambda i: room[i], default=None)
        if best is None:
            packs.append([row])
            room.append(capacity - len(row))
        else:
            packs[best].append(row)
            room[best] -= len(row)
    return packs


def sft_batches(args, vocab: int):
    """(batches, real tokens per epoch, positions per epoch); a batch = dict of tensors."""
    import torch

    seq = seq_len(args)
    rows = synthetic_rows(48 if args.small else args.rows, seq // 16, seq * 3 // 4, vocab)
    batches = []
    if args.packing == "on":
        for pack in pack_bfd(rows, seq):
            ids = [t for row in pack for t in row]
            pos = [p for row in pack for p in range(len(row))]
            labels = [t for row in pack for t in ([-100] + row[1:])]  # no loss across a row boundary
            batches.append({"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
                            "labels": torch.tensor([labels])})
    else:
        mbs = 2
        rows_sorted = rows  # data order, as a sampler would give it
        for i in range(0, len(rows_sorted), mbs):
            chunk = rows_sorted[i:i + mbs]
            width = max(len(r) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for j, row in enumerate(chunk):
                ids[j, :len(row)] = torch.tensor(row)
                mask[j, :len(row)] = 1
                labels[j, :len(row)] = torch.tensor(row)
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    real = sum(len(r) for r in rows)
    positions = sum(b["input_ids"].numel() for b in batches)
    return batches, real, positions


def apply_kernels(model, args):
    """The HF engine's kernels: attention for packed rows, Liger (as transformers' Trainer applies it for
    use_liger_kernel), torch.compile (as TrainingArguments.torch_compile)."""
    model.set_attn_implementation(args.attention)
    if args.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    return torch_compile(model) if args.compile else model


def torch_compile(model):
    import torch

    return torch.compile(model)


def timed_training(step, batches, args) -> tuple[float, int, float]:
    """(seconds, real tokens, last loss) over the timed batches, after args.warmup untimed ones."""
    warmup = 2 if args.small else args.warmup
    for batch in batches[:warmup]:
        step(batch)
    sync()
    timed = batches[warmup:warmup + args.steps] if args.steps else batches[warmup:]
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in timed)
    start = time.perf_counter()
    for batch in timed:
        loss = step(batch)
    sync()
    return time.perf_counter() - start, real, float(loss.detach()), len(timed)


def report_sft(check: str, args, params: int, seconds: float, real: int, steps: int, loss: float, padding: float, **extra):
    import torch

    tps = real / seconds
    emit(check=check, shape=f"{args.shape}-small" if args.small else args.shape, packing=args.packing, matmul_params=params,
         seq_len=seq_len(args), steps=steps, real_tokens=real, padding_share=round(padding, 4), seconds=round(seconds, 3),
         tokens_per_s=round(tps), loss=round(loss, 4), tflops=round(6 * params * tps / 1e12, 1),
         mfu_datasheet=round(6 * params * tps / (DATASHEET_BF16_TFLOPS * 1e12), 4),
         max_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if torch.cuda.is_available() else None,
         **extra)


def cmd_sft(args) -> None:
    import torch
    from transformers import LlamaForCausalLM

    vocab = 2048 if args.small else 128256
    torch.manual_seed(0)
    config = llama_config(args, vocab)
    with torch.device(device()):  # initialised where it trains (a 3.8B-parameter slice inits slowly on a CPU)
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=torch.cuda.is_available())
    trained = apply_kernels(model, args)
    batches, real, positions = sft_batches(args, vocab)
    autocast = torch.autocast(device_type=device().type, dtype=torch.bfloat16)

    def step(batch):
        batch = {k: v.to(device(), non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = trained(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    seconds, real_timed, loss, steps = timed_training(step, batches, args)
    report_sft("sft", args, params, seconds, real_timed, steps, loss, 1 - real / positions, engine="hf",
               attention=args.attention, liger=args.liger, compile=args.compile)


def cmd_generate(args) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from eval.engines import HFEngine, Sampling
    from recipes.tiny_model import build_tokenizer

    args.shape = "1b"

    tokenizer = build_tokenizer(8000)
    torch.manual_seed(0)
    config = llama_config(args, len(tokenizer))
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    config.pad_token_id = tokenizer.pad_token_id
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = LlamaForCausalLM(config).to(device=device(), dtype=dtype)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    rng = random.Random(0)
    words = "the response is mostly helpful but could improve its structure and examples".split()
    conversations = [[{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(20, 200)))}]
                     for _ in range(12 if args.small else 72)]
    # the first 8 warm up (and, static, compile); the timed rows are others, in batches of other shapes, as an
    # eval's are (a static cache's shape follows each batch's longest prompt: recompilations count here)
    warmup, conversations = conversations[:8], conversations[8:]
    sampling = Sampling(max_new_tokens=16 if args.small else 128, temperature=0.0)
    batch_size = min(args.batch_size, 4) if args.small else args.batch_size
    engine = HFEngine(model, tokenizer, batch_size=batch_size, cache_implementation=args.cache)
    engine.generate(warmup, sampling)
    sync()
    start = time.perf_counter()
    generations = engine.generate(conversations, sampling)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(g.completion_tokens for g in generations)
    emit(check="generate", cache=args.cache, batch_size=batch_size, rows=len(conversations), tokens=tokens,
         seconds=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1),
         texts_sha256=hashlib.sha256(json.dumps([g.text for g in generations]).encode()).hexdigest()[:16])


def cmd_rl_vllm(args) -> None:
    """TRL's vLLM rollouts (rl.vllm=colocate: one GPU is enough) where vllm is importable: a tiny RLOO run of 2
    steps through the real stage, which must push its weights into vLLM after step 1 (the part a CPU cannot
    run: NCCL) and finish with finite reward and KL and a final/ that differs from its start. Without vllm it
    is a probe that records why it did not run (docs/vllm.md)."""
    import importlib.util
    import subprocess
    import tempfile

    import torch

    have, cuda = importlib.util.find_spec("vllm") is not None, torch.cuda.is_available()
    if not (have and cuda):
        emit(check="rl_vllm", probe=True, vllm_importable=have, cuda=cuda,
             status="not run: " + ("no vllm here (the CUDA vllm wheel is too large to bring to this machine)"
                                   if not have else "needs CUDA (NCCL weight push)"))
        return
    from safetensors.torch import load_file

    from tests.vllm_server import build_model

    run = Path(tempfile.mkdtemp(prefix="rl-vllm-"))
    policy, rm = build_model(run / "policy"), build_model(run / "rm", seed=1, classifier=True)
    root = Path(__file__).resolve().parent.parent

    def launch(*argv):
        return subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=root, capture_output=True, text=True,
                              timeout=400)

    data = launch("data", f"run_dir={run}", "model=tiny", "prep.source=data_prep/sample")
    done = launch("rl", f"run_dir={run}", "model=tiny", f"init={policy}", f"rm={rm}", "rl.vllm=colocate",
                  "rl.vllm_gpu_memory_utilization=0.3", "train.max_steps=2", "train.save_steps=2", "rl.max_new_tokens=16",
                  "model.dtype=bfloat16", "train.bf16=true", "rl.mask_truncated_completions=false")
    summary = json.loads((run / "rl" / "summary.json").read_text()) if done.returncode == 0 else {}
    moved = None
    if (run / "rl" / "final" / "model.safetensors").is_file():
        before, after = load_file(str(policy / "model.safetensors")), load_file(str(run / "rl" / "final" / "model.safetensors"))
        moved = any(not torch.equal(before[k].float(), after[k].float()) for k in before if k in after)
    finite = all(isinstance(summary.get(k), float) and math.isfinite(summary[k]) for k in ("value", "kl"))
    emit(check="rl_vllm", mode="colocate", data_exit=data.returncode, exit=done.returncode, mean_reward=summary.get("value"),
         kl=summary.get("kl"), finite=finite, weights_moved=moved, ok=done.returncode == 0 and finite and bool(moved),
         stderr_tail=done.stderr[-400:] if done.returncode else None)


def megatron_init():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29513")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(123)
    else:  # CPU dry run only: the unfused attention takes its score buffer from a CUDA-only scratch buffer
        import contextlib

        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        from megatron.core.utils import GlobalMemoryBuffer

        GlobalMemoryBuffer.get_tensor = lambda self, shape, dtype, name, mem_alloc_context=None: torch.empty(shape, dtype=dtype)
        get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()  # and its dropout RNG is CUDA's


def cmd_megatron_slice(args) -> None:
    """megatron-core's GPTModel (local spec) on the sft check's shape and packs: the baseline of the ratio."""
    import torch
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    import megatron.core

    megatron_init()
    vocab = 2048 if args.small else 128256
    shape = SMALL_SHAPE if args.small else SHAPES[args.shape]
    seq = seq_len(args)
    config = TransformerConfig(
        num_layers=shape["num_hidden_layers"], hidden_size=shape["hidden_size"], ffn_hidden_size=shape["intermediate_size"],
        num_attention_heads=shape["num_attention_heads"], num_query_groups=shape["num_key_value_heads"],
        normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, bias_dropout_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=torch.bfloat16, bf16=True)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=vocab, max_sequence_length=seq, rotary_base=500000,
                     # megatron-core's RoPE moves itself to CUDA (rotary_pos_embedding.py get_emb): the CPU dry run
                     # takes learned positions instead
                     position_embedding_type="rope" if torch.cuda.is_available() else "learned_absolute",
                     share_embeddings_and_output_weights=False)
    lookups = [model.embedding.word_embeddings, getattr(model.embedding, "position_embeddings", None)]
    params = sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in lookups if m is not None)
    # as megatron's training loop wraps it for bf16: every weight in bf16, inputs cast, the loss back in fp32
    from megatron.core.transformer.module import Float16Module

    model = Float16Module(config, model).to(device())
    # bf16 weights and optimizer state (megatron's layers take no autocast: their backward wants the weight's
    # dtype); the HF side keeps fp32 weights under autocast as the engine trains, so its optimizer step moves
    # more bytes: the ratio leans, if anything, towards megatron-core
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=torch.cuda.is_available())
    args.packing = "on"
    batches, real, positions = sft_batches(args, vocab)

    def step(batch):
        ids = batch["input_ids"].to(device())
        pos = batch["position_ids"].to(device())
        width = ids.shape[1]
        doc = (pos == 0).cumsum(-1)  # document index of each position
        # megatron's mask: True = masked out; causal within each document (block-diagonal)
        causal = torch.triu(torch.ones(width, width, dtype=torch.bool, device=device()), 1)
        mask = (causal | (doc[:, :, None] != doc[:, None, :]))[:, None]
        labels = batch["labels"].to(device())
        # HF shifts its labels inside the loss; megatron takes next-token labels as given
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        keep = (targets != -100).float()
        per_token = model(ids, pos, mask, labels=targets.clamp(min=0))
        loss = (per_token.float() * keep).sum() / keep.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    seconds, real_timed, loss, steps = timed_training(step, batches, args)
    report_sft("sft", args, params, seconds, real_timed, steps, loss, 1 - real / positions, engine="megatron_core",
               version=megatron.core.__version__, attention="local (unfused, dense mask)", liger=False, compile=False)
    dist.destroy_process_group()


def cmd_megatron(args) -> None:
    """megatron-core's GPTModel (local layer spec, no Transformer Engine) with our tiny Llama shape,
    TP1 PP1 on one GPU, a few optimizer steps on rows from the bundled sample's sft data."""
    import torch
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from recipes.tiny_model import build_tokenizer

    if args.shape != "tiny":
        return cmd_megatron_slice(args)
    megatron_init()
    tokenizer = build_tokenizer(2048)
    config = TransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                               num_query_groups=2, normalization="RMSNorm", gated_linear_unit=True,
                               activation_func=torch.nn.functional.silu, add_bias_linear=False,
                               use_cpu_initialization=True, bf16=torch.cuda.is_available(),
                               params_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    seq = 256
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=len(tokenizer), max_sequence_length=seq,
                     position_embedding_type="rope" if torch.cuda.is_available() else "learned_absolute")  # as above
    model.to(device())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sample = Path(__file__).resolve().parent.parent / "data_prep" / "sample" / "edit" / "train.jsonl"
    texts = []
    for line in sample.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(tokenizer.apply_chat_template(
            row["context"] + [{"role": "assistant", "content": row["edited_response"]}], tokenize=False))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:seq + 1] for t in texts]
    ids = [row + [tokenizer.pad_token_id] * (seq + 1 - len(row)) for row in ids]
    data = torch.tensor(ids, device=device())
    position_ids = torch.arange(seq, device=device()).unsqueeze(0).expand(data.shape[0], -1)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device()), 1)[None, None]
    losses = []
    for _ in range(8):
        per_token = model(data[:, :-1], position_ids, causal, labels=data[:, 1:])
        loss = per_token.float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(float(loss), 4))
    import megatron.core

    emit(check="megatron_core", version=megatron.core.__version__, rows=data.shape[0], seq_len=seq, losses=losses,
         decreased=losses[-1] < losses[0])
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["matmul", "sft", "generate", "megatron", "rl_vllm"])
    parser.add_argument("--shape", choices=["1b", "slice", "tiny"], default=None,
                        help="sft: 1b (default) or slice; megatron: tiny (default: our tiny Llama, a few steps) or slice")
    parser.add_argument("--packing", choices=["on", "off"], default="on")
    parser.add_argument("--attention", default="sdpa", help="sdpa | flex_attention | flash_attention_2 | eager")
    parser.add_argument("--liger", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic", help="generate: the KV cache")
    parser.add_argument("--batch-size", type=int, default=32, help="generate: rows per batch")
    parser.add_argument("--rows", type=int, default=384, help="sft: synthetic rows (packs of seq tokens)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="sft: timed steps (0: every batch after the warm-up)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny shapes, to check the script on a CPU")
    args = parser.parse_args()
    args.shape = args.shape or ("tiny" if args.check == "megatron" else "1b")
    {"matmul": cmd_matmul, "sft": cmd_sft, "generate": cmd_generate, "megatron": cmd_megatron,
     "rl_vllm": cmd_rl_vllm}[args.check](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
