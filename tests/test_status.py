"""`./launch.sh status RUN_DIR|STAGE_DIR`: every stage kind, a stage dir on its own, and files that
cannot be trusted (issue 19 item 6, issue 18 item 12)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .conftest import REPO_ROOT, run_cli


def status(path, *extra) -> subprocess.CompletedProcess:
    return run_cli("-m", "launcher", "status", str(path), *extra, timeout=120)


def status_rows(path) -> dict[str, dict]:
    proc = status(path, "--json")
    assert proc.returncode == 0, proc.stderr
    return {row["stage"]: row for row in json.loads(proc.stdout)["stages"]}


def write(path, text) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if isinstance(text, str) else json.dumps(text))


def config(stage, **extra) -> str:
    return "\n".join(f"{k}: {v}" for k, v in {"stage": stage, "engine": "hf", "executor": "local", **extra}.items()) + "\n"


@pytest.fixture
def run_dir(tmp_path):
    """One dir of each kind, in the files each stage writes (data, a finished, a preempted and a stopped
    training stage, a Megatron convert rendered at submission, an eval and an its half way, a link)."""
    run = tmp_path / "run"
    write(run / "data" / "manifest.json", {"counts": {}})
    write(run / "data" / "config.yaml", config("data"))
    write(run / "data" / "summary.json", {"stage": "data", "metric": "sft_train_rows", "value": 133, "wall_s": 3.9})
    sft = run / "sft"
    write(sft / "config.yaml", config("sft"))
    write(sft / "progress.json", {"stage": "sft", "step": 34, "max_steps": 34, "elapsed_s": 65, "eta_s": 0,
                                  "updated": time.time(), "finished": True})
    write(sft / "summary.json", {"stage": "sft", "metric": "eval_loss", "value": 7.2696, "wall_s": 70})
    (sft / "final").mkdir()
    rl = run / "rl"
    write(rl / "config.yaml", config("rl"))
    write(rl / "progress.json", {"stage": "rl", "step": 3, "max_steps": 6, "elapsed_s": 30, "eta_s": 30,
                                 "updated": time.time(), "finished": False})
    (rl / "checkpoint-3").mkdir()
    write(rl / "PREEMPTED", "")
    dpo = run / "dpo"
    write(dpo / "config.yaml", config("dpo"))
    write(dpo / "progress.json", {"stage": "dpo", "step": 2, "max_steps": 10, "elapsed_s": 20, "eta_s": 80,
                                  "updated": time.time() - 3600, "finished": False})
    (dpo / "checkpoint-2").mkdir()
    write(run / "sft_export" / "config.yaml", config("convert", engine="megatron", executor="slurm"))
    write(run / "sft_export" / "command.sh", "python run_conversion.py export\n")
    write(run / "eval" / "config.yaml", config("eval"))
    write(run / "eval" / "cache" / "generations.jsonl", '{"key": 1}\n{"key": 2}\n{"key": 3}\n')
    write(run / "its" / "config.yaml", config("its"))
    write(run / "its" / "progress.jsonl", '{"record": {}}\n{"record": {}}\n')
    other = tmp_path / "other_run" / "rm"
    write(other / "config.yaml", config("rm"))
    write(other / "summary.json", {"stage": "rm", "metric": "val_accuracy", "value": 0.9375, "wall_s": 14})
    (run / "rm").symlink_to(other)
    return run


def test_every_stage_kind(run_dir):
    rows = status_rows(run_dir)
    assert list(rows) == ["data", "sft", "sft_export", "rm", "rl", "dpo", "eval", "its"]  # pipeline order
    assert rows["data"]["state"] == "finished" and rows["data"]["metric"] == "sft_train_rows = 133"
    assert rows["sft"]["state"] == "finished" and rows["sft"]["metric"] == "eval_loss = 7.27"
    assert rows["sft"]["progress"] == "step 34/34 (100%), 1m05s elapsed"
    assert rows["rm"]["state"] == "finished" and rows["rm"]["notes"] == [f"linked from {run_dir.parent / 'other_run' / 'rm'}"]
    assert rows["rl"]["state"] == "preempted at checkpoint-3"
    assert rows["rl"]["progress"].startswith("step 3/6 (50%), 30s elapsed, ETA ")
    # stopped an hour ago: the ETA counts down from when progress.json was written
    assert rows["dpo"]["state"] == "stopped at checkpoint-2 (rerun to resume)"
    assert rows["dpo"]["progress"] == "step 2/10 (20%), 20s elapsed, ETA 0s"
    assert rows["sft_export"]["state"] == "rendered (its job has not started)"
    assert rows["eval"]["progress"] == "3 generations cached" and rows["eval"]["state"].startswith("stopped")
    assert rows["its"]["progress"] == "2 prompts done"

    proc = status(run_dir)  # the table a user reads
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "8 stages: 3 finished, 1 preempted, 1 rendered, 3 stopped"


def test_a_running_stage_and_a_stage_dir_on_its_own(run_dir):
    """A process holding the stage's lock is `running`; the stage dir itself is accepted (it was
    'no such file jobs.json')."""
    out = run_dir / "dpo"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from recipes.preemption import OutputLock\n"
         f"with OutputLock({str(out)!r}):\n    print('held', flush=True); time.sleep(120)"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        row = status_rows(out)["dpo"]
        assert row["state"].startswith("running (") and str(holder.pid) in row["state"], row
        assert row["progress"].startswith("step 2/10")
    finally:
        holder.kill()
        holder.wait()
    assert status_rows(out)["dpo"]["state"].startswith("stopped")
    proc = status(run_dir / "sft")
    assert proc.returncode == 0 and "eval_loss = 7.27" in proc.stdout and proc.stdout.strip().endswith("1 stage: 1 finished")


def test_slurm_jobs_slurm_has_forgotten(run_dir):
    """jobs.json rows: a job SLURM does not know (no SLURM here, or MinJobAge passed) keeps its files' state."""
    write(run_dir / "jobs.json", {"sft": {"job_id": "901", "out": str(run_dir / "sft"), "log": str(run_dir / "slurm" / "sft-901.log")},
                                  "rl_export": {"job_id": "905", "out": str(run_dir / "rl_export"), "log": ""}})
    write(run_dir / "slurm" / "sft-901.log", "step 1\n[hs3] sft exited with 0\n")
    rows = status_rows(run_dir)
    assert rows["sft"]["state"] == "finished" and rows["sft"]["job"] == "901"
    assert rows["sft"]["last"] == "[hs3] sft exited with 0"
    assert rows["rl_export"]["state"] == "gone (SLURM forgot the job; no summary.json)"


CORRUPT = [
    ("jobs.json", "{not json", "jobs.json: not JSON"),
    ("jobs.json", "", "jobs.json: not JSON (empty)"),
    ("jobs.json", "[1, 2]", "jobs.json: a JSON list, not an object"),
    ("jobs.json", '{"sft": "12"}', "jobs.json: entry 'sft' has no job id"),
    ("jobs.json", '{"sft": {"job_id": true, "out": 5}}', "jobs.json: entry 'sft' has no job id"),
    ("sft/summary.json", '{"stage": "sft", "metric": "eval_loss", "val', "summary.json: not JSON (cut short?)"),
    ("sft/summary.json", "null", "summary.json: a JSON null, not an object"),
    ("sft/summary.json", '{"metric": "eval_loss", "value": "7.2"}', "summary.json: value of eval_loss is not a number"),
    ("sft/summary.json", '{"metric": ["x"], "value": 1}', "summary.json: no metric name"),
    ("sft/progress.json", b"\xff\xfe\x00garbage", "progress.json: unreadable (UnicodeDecodeError)"),
    ("sft/progress.json", '{"step": "40", "max_steps": 100}', "progress.json: step is not a number"),
    ("sft/progress.json", '{"step": 4, "max_steps": "many", "eta_s": "soon"}', "progress.json: max_steps is not a number"),
    ("sft/progress.json", '{"step": 4, "max_steps": 10, "elapsed_s": NaN}', "progress.json: elapsed_s is not a number"),
    ("sft/config.yaml", "stage: [unclosed", "config.yaml: unreadable"),
    ("sft/config.yaml", "- a list", "config.yaml: not a mapping"),
]


@pytest.mark.parametrize("name, content, note", CORRUPT, ids=[f"{c[0]}-{i}" for i, c in enumerate(CORRUPT)])
def test_a_damaged_file_is_a_note_never_a_traceback(run_dir, name, content, note):
    path = run_dir / name
    if name == "jobs.json":
        write(path, "{}")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = status(run_dir)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    proc = status(run_dir, "--json")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    shown = json.loads(proc.stdout)
    notes = shown["notes"] + [n for row in shown["stages"] for n in row["notes"]]
    assert any(note in n for n in notes), notes
    assert {r["stage"]: r["state"] for r in shown["stages"]}["data"] == "finished"  # the rest is still shown


def test_bad_paths_are_one_line_errors(tmp_path):
    for path, message in ((tmp_path / "nope", "no such directory"), (tmp_path, "no stage has started there")):
        proc = status(path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    proc = run_cli("-m", "launcher", "status", timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: usage: ./launch.sh status RUN_DIR|STAGE_DIR")
