"""The local pipeline: a failed stage stops the ones after it, and a rerun picks up where it stopped."""
from __future__ import annotations

import json

import pytest

from recipes.pipeline import PIPELINE_STAGES, load_preset, split_args

from .conftest import run_cli


def smoke_args(run_dir) -> list[str]:
    """The smoke preset's settings as command-line args of `./launch.sh pipeline` (STAGE:key=value)."""
    common, per_stage = load_preset("smoke")
    args = [a for a in common if not a.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    return args + [f"{stage}:{arg}" for stage in PIPELINE_STAGES for arg in per_stage[stage]]


def test_stage_args_split_by_prefix():
    common, per_stage, dry_run = split_args(["model=tiny", "sft:train.lr=0.5", "rl:rl.k=2", "--dry-run"])
    assert common == ["model=tiny"] and dry_run
    assert per_stage["sft"] == ["train.lr=0.5"] and per_stage["rl"] == ["rl.k=2"] and per_stage["rm"] == []


def test_unknown_stage_prefix_is_one_line_error():
    proc = run_cli("-m", "recipes", "pipeline", "sfft:train.lr=0.5", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: 'sfft:train.lr=0.5': 'sfft' is not a pipeline stage (data, sft, rm, rl, eval)"


@pytest.mark.slow
def test_failed_stage_stops_the_pipeline_and_a_rerun_resumes_there(tmp_path):
    args = smoke_args(tmp_path)
    failed = run_cli("-m", "recipes", "pipeline", *args, f"rl:rm={tmp_path}/no_such_rm", timeout=900)
    assert failed.returncode == 2
    assert "error: stage rl failed (exit 2); later stages not run." in failed.stderr
    assert f"reward_model={tmp_path}/no_such_rm: no model there" in failed.stderr  # the stage's own one line
    done = {stage for stage in PIPELINE_STAGES if (tmp_path / stage / "summary.json").is_file()}
    assert done == {"data", "sft", "rm"}
    sft_weights = (tmp_path / "sft" / "final" / "model.safetensors").stat().st_mtime_ns

    rerun = run_cli("-m", "recipes", "pipeline", *args, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for stage in ("data", "sft", "rm"):
        assert f"{stage}: finished earlier with the same config, skipped" in rerun.stderr
    assert (tmp_path / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_weights  # not retrained
    assert json.loads((tmp_path / "rl" / "summary.json").read_text())["stage"] == "rl"
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert {"copy_rate", "reward_win_rate", "chrf", "rouge_l", "rm_accuracy"} <= set(report)
    assert "pipeline summary" in rerun.stderr and "(skipped)" in rerun.stderr
