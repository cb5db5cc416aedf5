"""Smoke tests of the benchmark scripts, run as a user runs them, at the smallest settings they accept: they
run end to end and print their figures against their named baseline. The figures themselves are not asserted
(a random tiny model learns nothing); what is asserted is that what they print is what their steps wrote."""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_cli


@pytest.mark.slow  # five CLI processes (data, sft, eval x2, eval-compare): about a minute on 2 cores
def test_learn_bench_runs_on_the_tiny_model_and_prints_sft_against_base(tmp_path):
    run = tmp_path.resolve() / "lb"  # the script resolves --run-dir
    proc = run_cli("benchmarks/learn_bench.py", "--model", "tiny", "--max-steps", "1", "--max-rows", "2",
                   "--max-new-tokens", "4", "--bootstrap-samples", "10", "--run-dir", str(run))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = proc.stdout
    commands = {"data": "data model=tiny", "sft": "sft model=tiny", "eval base": "eval model=tiny init=null",
                "eval sft": f"eval model=tiny init={run}/sft/final", "compare": "eval-compare --paired"}
    for name, command in commands.items():  # every step is the project's CLI, printed, and it ran
        assert f"[learn_bench] {name}: python -m launcher {command} " in out, name
        assert re.search(rf"^\[learn_bench\] {name}: [0-9.]+ s, exit 0$", out, re.M), name

    sft = json.loads((run / "sft" / "summary.json").read_text())
    paired = json.loads((run / "compare" / "paired.json").read_text())
    assert (paired["a"], paired["b"]) == ("sft", "base")  # the ratio is sft against the base model, as named
    assert paired["dirs"] == [str(run / "eval" / "sft"), str(run / "eval" / "base")]
    assert sft["steps"] == 1
    assert (f"learn_bench: tiny, edit SFT on data_prep/sample (1 steps, validation loss {sft['value']:.3f}), "
            f"scored on 2 held-out edit rows (greedy, 4 new tokens)") in out
    assert re.search(r"^metric +base +sft +sft - base \[95% CI\] +CI excludes 0$", out, re.M)
    # one row per metric: base, sft, sft - base [CI], whether the CI excludes 0 and n, as paired.json has them
    rows = {m[0]: m[1:] for m in re.findall(
        r"^(\w+) +(-?[0-9.]+) +(-?[0-9.]+) +([+-][0-9.]+) \[([+-][0-9.]+), ([+-][0-9.]+)\] +(yes|no) \(n=(\d+)\)$", out, re.M)}
    assert {"rouge_l", "chrf", "copy_rate", "policy_pref_accuracy"} <= set(rows), out
    for key, (base, after, diff, low, high, excludes, n) in rows.items():
        r = paired["metrics"][key]
        assert [float(base), float(after), float(diff), float(low), float(high)] == pytest.approx(
            [r["b"], r["a"], r["diff"], r["ci"][0], r["ci"][1]], abs=5e-4), key
        assert excludes == ("yes" if r["verdict"] == "outside" else "no") and int(n) == r["n"], key
    assert rows["rouge_l"][-1] == "2"  # --max-rows 2 held-out edit rows
    base_report = json.loads((run / "eval" / "base" / "report.json").read_text())
    assert float(rows["copy_rate"][0]) == pytest.approx(base_report["overall"]["copy_rate"]["value"], abs=5e-4)
    wall = re.search(r"^wall time: data [0-9.]+ s, sft [0-9.]+ s, eval base [0-9.]+ s, eval sft [0-9.]+ s, "
                     r"compare [0-9.]+ s; total \d+ s$", out, re.M)
    assert wall and out.rstrip().endswith(wall.group(0))
