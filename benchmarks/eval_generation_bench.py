"""Eval generation throughput on the tiny model (CPU).

    .venv/bin/python benchmarks/eval_generation_bench.py [--rows 64] [--max-new-tokens 32]
                                                         [--batch-size 16] [--concurrency 16]

1. In-process engine: batched generation with left padding (--batch-size) against the baseline,
   one conversation at a time. Goal: >= 4x the baseline's throughput.
2. HTTP engine against `python -m eval.serve` (a real local server process) at --concurrency
   requests in flight, against the baseline of one request at a time.

Prompts are the bundled sample's edit/validation rows in the exact edit-request format, repeated
to --rows. Every run generates exactly --max-new-tokens tokens per row (the tiny random model
never emits its end-of-turn token), so rows/s and tokens/s compare like with like.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def sample_prompts(rows: int) -> list[list[dict]]:
    from data_prep import build_edit_conversation

    lines = (REPO_ROOT / "data_prep" / "sample" / "edit" / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    prompts = [build_edit_conversation(r["context"], r["original_response"], r["feedback"]) for r in records]
    return [prompts[i % len(prompts)] for i in range(rows)]


def timed(fn) -> tuple[float, list]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def report(name: str, seconds: float, generations: list) -> float:
    tokens = sum(g.completion_tokens for g in generations)
    print(f"  {name:<34} {seconds:7.2f} s  {len(generations) / seconds:8.2f} rows/s  {tokens / seconds:9.1f} tokens/s")
    return len(generations) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    import torch

    from eval.engines import HFEngine, HTTPEngine, Sampling
    from recipes.config import compose
    from recipes.models import resolve_model_path

    model_cfg = compose("eval", ["model=tiny"]).model
    model_dir = resolve_model_path(model_cfg)
    prompts = sample_prompts(args.rows)
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    print(f"tiny model {model_dir}; {args.rows} rows, {args.max_new_tokens} new tokens each, "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads")

    engine = HFEngine.load(model_cfg, None, batch_size=args.batch_size)
    engine.generate(prompts[:2], sampling)  # warm-up
    print("1. in-process transformers engine")
    engine.batch_size = 1
    seconds, single = timed(lambda: engine.generate(prompts, sampling))
    baseline = report("one at a time (baseline)", seconds, single)
    engine.batch_size = args.batch_size
    seconds, batched = timed(lambda: engine.generate(prompts, sampling))
    batched_rate = report(f"batched, batch size {args.batch_size}", seconds, batched)
    same = sum(a.text == b.text for a, b in zip(single, batched))
    print(f"  ratio: {batched_rate / baseline:.1f}x (goal >= 4x); identical outputs: {same}/{len(prompts)}")
    del engine

    print(f"2. HTTP engine against python -m eval.serve (max batch {args.concurrency})")
    server = subprocess.Popen([sys.executable, "-m", "eval.serve", "--model", model_dir, "--port", "0", "--name", "tiny",
                               "--max-batch", str(args.concurrency)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = server.stdout.readline().split()[-1]
        HTTPEngine(url, concurrency=2).generate(prompts[:2], sampling)  # warm-up
        seconds, serial = timed(lambda: HTTPEngine(url, concurrency=1).generate(prompts, sampling))
        serial_rate = report("concurrency 1 (baseline)", seconds, serial)
        seconds, concurrent = timed(lambda: HTTPEngine(url, concurrency=args.concurrency).generate(prompts, sampling))
        concurrent_rate = report(f"concurrency {args.concurrency}", seconds, concurrent)
        print(f"  ratio: {concurrent_rate / serial_rate:.1f}x; "
              f"vs the in-process batched engine: {concurrent_rate / batched_rate:.2f}x")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"summary: batched {batched_rate / baseline:.1f}x one-at-a-time; HTTP concurrency {args.concurrency} "
          f"{concurrent_rate / serial_rate:.1f}x concurrency 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
