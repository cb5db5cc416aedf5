"""ITS wall time against a local server: concurrent requests vs one call at a time (CPU, tiny model).

    .venv/bin/python benchmarks/its_bench.py [--prompts 8] [--concurrency 16] [--max-new-tokens 16] [--repeats 1]

Starts `python -m eval.serve` (the policy, feedback and edit model: the tiny model) and
`python -m eval.serve_rm` (the select model: the tiny model as a first_logit scorer) on 127.0.0.1, then
runs the whole its loop (its.loop.run: 2 responses x 3 feedback x 1 edit per prompt) twice per repeat,
its.concurrency=1 (baseline: one call at a time) and its.concurrency=N, each into a fresh output dir
(no cache), alternating. Prints both wall times and the ratio baseline / concurrent (median over the
repeats). eval.serve batches concurrent requests (--max-batch 16), which is where the gain comes from.
Timings on a shared machine vary: run it on an idle one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Sort [3, 1, 2] in Python.",
             "Explain photosynthesis briefly.", "Give three tips for sleeping well.", "What is 17 * 23?",
             "Draft a polite email declining a meeting.", "What is the boiling point of water?"]


def serve(module: str, model: str, *extra: str):
    proc = subprocess.Popen([sys.executable, "-m", module, "--model", model, "--port", "0", *extra], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        raise SystemExit(f"{module} did not start: {line!r}")
    return proc, line.split()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from its.loop import run
    from recipes.config import compose
    from recipes.models import resolve_model_path

    model = resolve_model_path(compose("its", []).model)
    gen, gen_url = serve("eval.serve", model, "--name", "tiny", "--max-batch", "16")
    rm, rm_url = serve("eval.serve_rm", model, "--name", "select", "--kind", "first_logit")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}) + "\n"
                                       for i in range(args.prompts)))
            common = [f"prompts={prompts}", f"policy={gen_url}", f"feedback_model={gen_url}", f"edit_model={gen_url}",
                      f"select_model={rm_url}", "its.responses=2", "its.feedbacks=3", "its.edits=1",
                      f"its.max_new_tokens={args.max_new_tokens}", f"its.feedback_max_new_tokens={args.max_new_tokens}"]
            times = {1: [], args.concurrency: []}
            for r in range(args.repeats):
                for concurrency in (1, args.concurrency):
                    cfg = compose("its", common + [f"its.concurrency={concurrency}", f"out={tmp}/run-{concurrency}-{r}"])
                    start = time.perf_counter()
                    run(cfg)
                    times[concurrency].append(time.perf_counter() - start)
    finally:
        gen.terminate()
        rm.terminate()
    base, fast = statistics.median(times[1]), statistics.median(times[args.concurrency])
    print(f"its loop, {args.prompts} prompts x 2 responses x 3 feedback x 1 edit, {args.max_new_tokens} new tokens, "
          f"eval.serve + eval.serve_rm on 127.0.0.1")
    print(f"  one call at a time : {base:.2f} s")
    print(f"  concurrency {args.concurrency:<6} : {fast:.2f} s")
    print(f"  ratio              : {base / fast:.2f}x  (median of {args.repeats} repeat(s))")


if __name__ == "__main__":
    main()
