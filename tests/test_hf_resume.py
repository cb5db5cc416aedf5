"""resume=auto: a run stopped mid-way and restarted ends at the same step with the same loss trajectory
as an uninterrupted run (optimizer, scheduler, RNG and data position restored from checkpoint-N)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from recipes.preemption import PREEMPT_REQUEST_FILE, PREEMPTED_EXIT_CODE
from tests.conftest import REPO_ROOT, run_cli

MAX_STEPS = 8


def sft_args(data_dir, out):
    # cosine schedule with warmup: a scheduler that was not restored would change the losses after resume
    return ["-m", "launcher", "sft", f"data={data_dir}", f"out={out}", f"train.max_steps={MAX_STEPS}",
            "train.save_steps=2", "train.eval_steps=1000", "train.logging_steps=1", "train.warmup_ratio=0.2",
            "train.lr_scheduler=cosine"]


def losses(out) -> dict[int, float]:
    state = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def test_stopped_and_resumed_run_matches_uninterrupted_run(edit_data_dir, tmp_path, tiny_model_dir):
    straight = run_cli(*sft_args(edit_data_dir, tmp_path / "straight"), timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    # Stop the second run the way SLURM preemption does (the request file), once checkpoint-2 exists.
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, *sft_args(edit_data_dir, out)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "checkpoint-2" / "trainer_state.json").exists() and proc.poll() is None:
        time.sleep(0.02)
    (out / PREEMPT_REQUEST_FILE).touch()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-2000:]
    stopped_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert 2 <= stopped_at < MAX_STEPS and not (out / "final").exists()

    resumed = run_cli(*sft_args(edit_data_dir, out), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"sft: resuming from {out / f'checkpoint-{stopped_at}'}" in resumed.stderr

    expected, got = losses(tmp_path / "straight"), losses(out)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)) == sorted(expected)
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-4 * abs(expected[step]), (step, got[step], expected[step])
