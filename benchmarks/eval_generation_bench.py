"""Eval generation throughput on the tiny model (CPU).

    .venv/bin/python benchmarks/eval_generation_bench.py [--rows 64] [--max-new-tokens 32]
                                                         [--batch-size 16] [--concurrency 16] [--repeats 5]

1. In-process engine: batched generation with left padding (--batch-size) against the baseline,
   one conversation at a time. Goal: >= 4x the baseline's throughput.
2. HTTP engine against `python -m eval.serve` (a real local server process) at --concurrency
   requests in flight, against the baseline of one request at a time.

Prompts are the bundled sample's edit/validation rows in the exact edit-request format, repeated
to --rows. Every run generates exactly --max-new-tokens tokens per row (the tiny random model
never emits its end-of-turn token), so rows/s and tokens/s compare like with like.

Each comparison runs --repeats times, baseline and contender alternating (so a load change on the
machine hits both); the figures reported are the median ratio with its range (min-max) over the repeats.
Timings on a shared machine vary: run it on an idle one.
"""
from __future__ import annotations

import argparse
import json
import statistics
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


def spread(ratios: list[float]) -> str:
    """'median x (range min-max, n runs)'."""
    return f"{statistics.median(ratios):.1f}x (range {min(ratios):.1f}-{max(ratios):.1f}x, {len(ratios)} runs)"


def compare(repeats: int, baseline_name: str, baseline, contender_name: str, contender) -> tuple[list[float], list]:
    """Run baseline and contender alternately `repeats` times; the contender/baseline rows/s ratios
    and the last outputs of both."""
    ratios = []
    for r in range(repeats):
        print(f" run {r + 1}/{repeats}")
        seconds, base_out = timed(baseline)
        base_rate = report(baseline_name, seconds, base_out)
        seconds, cont_out = timed(contender)
        ratios.append(report(contender_name, seconds, cont_out) / base_rate)
    return ratios, [base_out, cont_out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each comparison (median and range reported)")
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
          f"torch {torch.__version__} on {torch.get_num_threads()} threads; {args.repeats} runs per comparison")

    engine = HFEngine.load(model_cfg, None, batch_size=args.batch_size)
    engine.generate(prompts[:2], sampling)  # warm-up
    print("1. in-process transformers engine")

    def at(batch_size: int, engine=engine):
        def run():
            engine.batch_size = batch_size
            return engine.generate(prompts, sampling)
        return run

    batched_ratios, (single, batched) = compare(args.repeats, "one at a time (baseline)", at(1),
                                                f"batched, batch size {args.batch_size}", at(args.batch_size))
    same = sum(a.text == b.text for a, b in zip(single, batched))
    print(f"  ratio: {spread(batched_ratios)} (goal >= 4x); identical outputs: {same}/{len(prompts)}")
    del engine

    print(f"2. HTTP engine against python -m eval.serve (max batch {args.concurrency})")
    server = subprocess.Popen([sys.executable, "-m", "eval.serve", "--model", model_dir, "--port", "0", "--name", "tiny",
                               "--max-batch", str(args.concurrency)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = server.stdout.readline().split()[-1]
        HTTPEngine(url, concurrency=2).generate(prompts[:2], sampling)  # warm-up
        http_ratios, _ = compare(args.repeats, "concurrency 1 (baseline)",
                                 lambda: HTTPEngine(url, concurrency=1).generate(prompts, sampling),
                                 f"concurrency {args.concurrency}",
                                 lambda: HTTPEngine(url, concurrency=args.concurrency).generate(prompts, sampling))
        print(f"  ratio: {spread(http_ratios)}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"summary: batched {spread(batched_ratios)} one-at-a-time; HTTP concurrency {args.concurrency} "
          f"{spread(http_ratios)} concurrency 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
