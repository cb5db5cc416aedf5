"""The `system` preset (conf/pipeline/system.yaml): three model chains after data, then its. On SLURM the
chains are parallel job chains (afterok on their own inputs only); locally, system_smoke runs every entry
on the tiny model and the sample rows."""
from __future__ import annotations

import json
import re

import pytest

from launcher.stages import load_preset
from tests.conftest import run_cli


def test_system_and_system_smoke_have_the_same_graph():
    _, system = load_preset("system")
    _, smoke = load_preset("system_smoke")
    graph = {name: (e.stage, e.needs) for name, e in system.items()}
    assert graph == {name: (e.stage, e.needs) for name, e in smoke.items()}
    assert graph["its"] == ("its", ("feedback", "rl", "select"))
    assert graph["eval_feedback"] == ("eval", ("feedback",)) and graph["eval_select"] == ("eval", ("select",))


def test_slurm_runs_the_three_chains_side_by_side(tmp_path):
    # its's SLURM job sizes its model servers from each checkpoint's config.json at submission
    # (launcher/its_job.py plan), before the chains have written them: here its is given endpoints.
    served = [f"its:{role}=http://{role}-host:8000/v1" for role in ("policy", "feedback_model", "edit_model")]
    done = run_cli("-m", "launcher", "pipeline", "preset=system", "executor=slurm", "cluster=example",
                   f"run_dir={tmp_path}", *served, "its:select_model=http://select-host:8000", "--dry-run")
    assert done.returncode == 0, done.stderr
    after = dict((name, deps) for name, deps in
                 re.findall(r"^# ---- (\w+): sbatch --parsable(?: --dependency=afterok:(\S+))? \S+$", done.stdout, re.M))
    assert after["feedback"] == after["sft"] == after["select"] == "$DATA_JOB"  # none waits for another chain
    assert after["rm"] == "$SFT_JOB" and after["rl"] == "$SFT_JOB:$RM_JOB"
    assert after["its"] == "$FEEDBACK_JOB:$RL_JOB:$SELECT_JOB"


@pytest.mark.slow
def test_system_smoke_runs_every_entry_locally(tmp_path):
    run = tmp_path / "run"
    done = run_cli("-m", "launcher", "pipeline", "preset=system_smoke", f"run_dir={run}", timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = {name: json.loads((run / name / "summary.json").read_text())
                 for name in ("data", "feedback", "sft", "rm", "rl", "select", "eval", "eval_feedback", "eval_select", "its")}
    assert summaries["data"]["feedback_train_rows"] > 0 and summaries["data"]["select_train_rows"] > 0
    assert summaries["eval_feedback"]["task"] == "feedback" and summaries["eval_select"]["task"] == "select"
    records = [json.loads(line) for line in (run / "its" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    config = (run / "its" / "config.yaml").read_text()
    for model in ("feedback/final", "rl/final", "select/final"):
        assert f"{run}/{model}" in config
    # A rerun finds every entry finished under the same config and rewrites nothing.
    stamps = {name: (run / name / "summary.json").stat().st_mtime_ns for name in summaries}
    again = run_cli("-m", "launcher", "pipeline", "preset=system_smoke", f"run_dir={run}", timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {name: (run / name / "summary.json").stat().st_mtime_ns for name in summaries} == stamps
