"""GPU measurements behind benchmarks/gpu_checks.sh (one subcommand per check; each prints JSON lines).

    python3 benchmarks/gpu_bench.py matmul                  # measured bf16 peak: 8192^3 matmul
    python3 benchmarks/gpu_bench.py sft [--packing on|off]  # ~1.2B random Llama, seq 4096, bf16, sdpa
    python3 benchmarks/gpu_bench.py generate                # HFEngine batched vs one at a time
    python3 benchmarks/gpu_bench.py megatron                # megatron-core GPT (local spec), a few steps

`--small` shrinks every model and shape so the script itself can be checked on a CPU before device
time is spent on it (the figures are then meaningless).

sft: MFU = 6 x N x trained tokens/s / peak, N = the parameters that do matrix work (all but the input
embedding, whose lookup is no FLOP; the output layer counts). Attention score FLOPs are not counted,
so at seq 4096 this understates the work done by ~10-15% for this shape. Trained tokens = real (non-pad)
tokens. Rows are synthetic: lengths drawn once (seeded) from 256..3072 tokens, the same rows for
both packing modes. Packed: rows are concatenated best-fit-decreasing into 4096-token packs with
position_ids restarting per row and no attention mask (transformers builds the block-diagonal
causal mask from the position_ids); unpacked: rows padded to the longest in the micro batch.
"""
from __future__ import annotations

import argparse
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


def llama_config(args, vocab: int):
    from transformers import LlamaConfig

    if args.small:
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=False)
    return LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                       tie_word_embeddings=False)


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

    seq = 256 if args.small else 4096
    rows = synthetic_rows(48 if args.small else 384, seq // 16, seq * 3 // 4, vocab)
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


def cmd_sft(args) -> None:
    import torch
    from transformers import LlamaForCausalLM

    vocab = 2048 if args.small else 128256
    torch.manual_seed(0)
    config = llama_config(args, vocab)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device())
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=torch.cuda.is_available())
    batches, real, positions = sft_batches(args, vocab)
    autocast = torch.autocast(device_type=device().type, dtype=torch.bfloat16)

    def step(batch):
        batch = {k: v.to(device(), non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    warmup = 2 if args.small else 3
    for batch in batches[:warmup]:
        step(batch)
    sync()
    timed = batches[warmup:]
    # real tokens in the timed batches (pads excluded)
    real_timed = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in timed)
    start = time.perf_counter()
    for batch in timed:
        loss = step(batch)
    sync()
    loss = loss.detach()
    seconds = time.perf_counter() - start
    tps = real_timed / seconds
    emit(check="sft", packing=args.packing, matmul_params=params, seq_len=256 if args.small else 4096,
         steps=len(timed), real_tokens=real_timed, padding_share=round(1 - real / positions, 4),
         seconds=round(seconds, 3), tokens_per_s=round(tps), loss=float(loss),
         tflops=round(6 * params * tps / 1e12, 1), mfu_datasheet=round(6 * params * tps / (DATASHEET_BF16_TFLOPS * 1e12), 4),
         max_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if torch.cuda.is_available() else None)


def cmd_generate(args) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from eval.engines import HFEngine, Sampling
    from recipes.tiny_model import build_tokenizer

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
                     for _ in range(8 if args.small else 32)]
    sampling = Sampling(max_new_tokens=16 if args.small else 128, temperature=0.0)
    results = {}
    for name, batch_size in (("one_at_a_time", 1), ("batched", 32)):
        engine = HFEngine(model, tokenizer, batch_size=batch_size)
        engine.generate(conversations[:2], sampling)  # warm-up
        sync()
        start = time.perf_counter()
        generations = engine.generate(conversations, sampling)
        sync()
        seconds = time.perf_counter() - start
        tokens = sum(g.completion_tokens for g in generations)
        results[name] = tokens / seconds
        emit(check="generate", mode=name, batch_size=batch_size, rows=len(conversations), tokens=tokens,
             seconds=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1))
    emit(check="generate", ratio_batched_vs_one=round(results["batched"] / results["one_at_a_time"], 2))


def cmd_megatron(args) -> None:
    """megatron-core's GPTModel (local layer spec, no Transformer Engine) with our tiny Llama shape,
    TP1 PP1 on one GPU, a few optimizer steps on rows from the bundled sample's sft data."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from recipes.tiny_model import build_tokenizer

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29513")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(123)
    tokenizer = build_tokenizer(2048)
    config = TransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                               num_query_groups=2, normalization="RMSNorm", gated_linear_unit=True,
                               activation_func=torch.nn.functional.silu, add_bias_linear=False,
                               use_cpu_initialization=True, bf16=torch.cuda.is_available(),
                               params_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    seq = 256
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=len(tokenizer), max_sequence_length=seq, position_embedding_type="rope")
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
    parser.add_argument("check", choices=["matmul", "sft", "generate", "megatron"])
    parser.add_argument("--packing", choices=["on", "off"], default="on")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny shapes, to check the script on a CPU")
    args = parser.parse_args()
    {"matmul": cmd_matmul, "sft": cmd_sft, "generate": cmd_generate, "megatron": cmd_megatron}[args.check](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
