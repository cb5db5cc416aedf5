"""ITS wall time against local servers: the loop one request at a time vs overlapped and concurrent (CPU).

    .venv/bin/python benchmarks/its_bench.py [--prompts 16] [--concurrency 16] [--max-batch 32]
                                             [--max-new-tokens 16] [--repeats 5]

Starts `python -m eval.serve` (the policy, feedback and edit model: the tiny model, batching concurrent
requests up to --max-batch) and `python -m eval.serve_rm` (the select model: the tiny model as a
first_logit scorer) on 127.0.0.1, then runs the whole its loop (its.loop.run: 2 responses x 3 feedback x
1 edit per prompt, every response and edit scored) per repeat in two settings, alternating, each into a
fresh output dir (no cache):
    sequential   its.prompts_in_flight=1 its.concurrency=1: one prompt at a time, each step one request at
                 a time (the baseline: exactly one request in flight, across every model);
    concurrent   its.prompts_in_flight=--prompts its.concurrency=--concurrency: every prompt in flight, the
                 steps of different prompts overlapping, each role up to --concurrency requests at once.
Prints both wall times per repeat, their medians, and the ratio sequential / concurrent (median of the
per-repeat ratios, with its range), with the load average before and after: timings on a shared machine
vary, so run it on an idle one. The gain comes from the servers batching concurrent requests; what bounds
it on a CPU is what a batch still costs per row (tokenization, the HTTP round trip and the Python of each
request, and the decode steps of a wider batch), shared by the client, both servers and anything else on
the machine's cores.
"""
from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight per role (concurrent run)")
    parser.add_argument("--max-batch", type=int, default=32, help="eval.serve's batch limit")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-p", type=float, default=0.9, help="its.top_p of the sampled requests (the loop's default 0.9)")
    args = parser.parse_args()

    from its.loop import run
    from recipes.config import compose
    from recipes.models import resolve_model_path

    model = resolve_model_path(compose("its", []).model)
    gen, gen_url = serve("eval.serve", model, "--name", "tiny", "--max-batch", str(args.max_batch))
    rm, rm_url = serve("eval.serve_rm", model, "--name", "select", "--kind", "first_logit")
    settings = {"sequential": ["its.prompts_in_flight=1", "its.concurrency=1"],
                "concurrent": [f"its.prompts_in_flight={args.prompts}", f"its.concurrency={args.concurrency}"]}
    times: dict[str, list[float]] = {name: [] for name in settings}
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}) + "\n"
                                       for i in range(args.prompts)))
            common = [f"prompts={prompts}", f"policy={gen_url}", f"feedback_model={gen_url}", f"edit_model={gen_url}",
                      f"select_model={rm_url}", "its.responses=2", "its.feedbacks=3", "its.edits=1",
                      f"its.max_new_tokens={args.max_new_tokens}", f"its.feedback_max_new_tokens={args.max_new_tokens}",
                      f"its.top_p={args.top_p}"]
            for r in range(args.repeats):
                for name, extra in settings.items():
                    cfg = compose("its", common + extra + [f"out={tmp}/run-{name}-{r}"])
                    start = time.perf_counter()
                    run(cfg)
                    times[name].append(time.perf_counter() - start)
                print(f"  repeat {r + 1}: sequential {times['sequential'][-1]:.2f} s, concurrent "
                      f"{times['concurrent'][-1]:.2f} s, ratio {times['sequential'][-1] / times['concurrent'][-1]:.2f}x",
                      flush=True)
    finally:
        gen.terminate()
        rm.terminate()
    load_after = os.getloadavg()
    ratios = [a / b for a, b in zip(times["sequential"], times["concurrent"])]
    print(f"its loop, {args.prompts} prompts x 2 responses x 3 feedback x 1 edit, {args.max_new_tokens} new tokens, "
          f"top_p {args.top_p}, "
          f"eval.serve (--max-batch {args.max_batch}) + eval.serve_rm on 127.0.0.1, {os.cpu_count()} CPUs")
    print(f"  sequential (1 prompt, 1 request in flight)     : {statistics.median(times['sequential']):.2f} s "
          f"(range {min(times['sequential']):.2f}-{max(times['sequential']):.2f})")
    print(f"  concurrent ({args.prompts} prompts, {args.concurrency} per role) : {statistics.median(times['concurrent']):.2f} s "
          f"(range {min(times['concurrent']):.2f}-{max(times['concurrent']):.2f})")
    print(f"  ratio sequential / concurrent : {statistics.median(ratios):.2f}x (median of {args.repeats}; range "
          f"{min(ratios):.2f}-{max(ratios):.2f}x)")
    print(f"  load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")


if __name__ == "__main__":
    main()
