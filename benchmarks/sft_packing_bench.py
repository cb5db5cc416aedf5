"""sft on the tiny model with packing vs without: trained tokens per second and the padding share.

    .venv/bin/python benchmarks/sft_packing_bench.py [--epochs 1] [--seq-len 1024] [--micro-batch 2] [--repeats 5]

Both runs train one epoch of the bundled sample's sft rows (data_prep/sample, built as the smoke
pipeline builds it) on the tiny model at the smoke sequence length. Packing (best-fit decreasing into
padding-free rows with position_ids, recipes/sft.py) is the candidate; the unpacked run (rows padded to
the longest in each micro batch) is the baseline. Goal: packed padding < 3% and packed tokens/s > unpacked.

Each comparison runs --repeats times, unpacked and packed alternating (a load change hits both); the
ratio is reported as the median with its range. On CPU packing can be slower than padding: the packed
rows' block-diagonal mask makes sdpa take its masked path, which costs more here than the padding it
saves. It pays on a GPU (2.27x measured on one H200 at seq 4096, benchmarks/gpu_checks.sh), where
train.packed_attention=auto also gives packed rows document-aware attention (flex_attention with a document
block mask, docs/gpu.md); on a CPU auto keeps sdpa (FlexAttention has no backward there), so this CPU
ratio is unchanged by it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def padding_share(trainer) -> tuple[int, int]:
    """(real tokens, sequence positions computed) over one epoch of the trainer's own batches."""
    real = positions = 0
    for batch in trainer.get_train_dataloader():
        positions += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return real, positions


def measure(data_dir: Path, run_dir: Path, packing: bool, args) -> dict:
    from recipes import sft
    from recipes.config import compose

    cfg = compose("sft", [f"run_dir={run_dir}", f"data={data_dir}", f"train.packing={str(packing).lower()}",
                          f"train.epochs={args.epochs}", f"train.seq_len={args.seq_len}",
                          f"train.micro_batch={args.micro_batch}", f"train.global_batch={args.micro_batch}",
                          "train.save_steps=100000", "train.eval_steps=100000", "train.logging_steps=100000"])
    trainer = sft.build_trainer(cfg)
    real, positions = padding_share(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"packing": packing, "steps": trainer.state.global_step, "real_tokens": real * args.epochs,
            "padding_share": 1 - real / positions, "seconds": seconds, "tokens_per_s": real * args.epochs / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, default=1024, help="the smoke sequence length (conf/model/tiny.yaml)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="runs of the comparison (median and range reported)")
    args = parser.parse_args()

    from data_prep.build import build
    from recipes.config import REPO_ROOT
    from transformers.utils import logging

    logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        build(str(REPO_ROOT / "data_prep" / "sample"), data_dir, progress=False)
        runs = []
        for r in range(args.repeats):
            print(f" run {r + 1}/{args.repeats}", flush=True)
            runs.append((measure(data_dir, Path(tmp) / f"unpacked{r}", False, args),
                         measure(data_dir, Path(tmp) / f"packed{r}", True, args)))

    print(f"\nsft on the tiny model, {args.epochs:g} epoch of the sample rows, seq_len {args.seq_len}, micro batch {args.micro_batch}")
    print(f"{'run':<10}{'steps':>7}{'tokens':>9}{'padding':>10}{'seconds':>9}{'tokens/s':>10}")
    for baseline, packed in runs:
        for name, r in (("unpacked", baseline), ("packed", packed)):
            print(f"{name:<10}{r['steps']:>7}{r['real_tokens']:>9.0f}{r['padding_share']:>10.1%}{r['seconds']:>9.1f}{r['tokens_per_s']:>10.0f}")
    ratios = [packed["tokens_per_s"] / baseline["tokens_per_s"] for baseline, packed in runs]
    baseline, packed = runs[0]
    print(f"packed / unpacked tokens/s: median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x, "
          f"{len(ratios)} runs); padding {packed['padding_share']:.1%} packed vs {baseline['padding_share']:.1%} unpacked (goal < 3%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
