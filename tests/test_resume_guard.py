"""resume=auto refuses an output dir trained with settings that change the result (issue 11, item 4):
it names the differing keys and leaves the run's record untouched; keys that change nothing (logging
cadence, checkpoint cadence) may differ; resume=never starts over."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from recipes.config import compose
from recipes.training import RESULT_NEUTRAL_KEYS, resume_conflicts
from tests.conftest import run_cli, write_edit_data


def sft_args(data_dir, out, *extra):
    return ["-m", "launcher", "sft", f"data={data_dir}", f"out={out}", "train.max_steps=2", "train.save_steps=1",
            "train.eval_steps=1000", *extra]


def test_resume_conflicts_lists_result_keys_only():
    old = compose("sft", [])
    new = compose("sft", ["train.lr=2e-5", "train.logging_steps=7", "peft.enabled=true", "run_dir=/elsewhere",
                          "train.save_steps=9", "seed=5"])
    assert resume_conflicts(old, new) == ["peft.enabled: False -> True", "seed: 1234 -> 5", f"train.lr: {old.train.lr} -> 2e-05"]
    assert resume_conflicts(old, old) == []
    assert "train.lr" not in RESULT_NEUTRAL_KEYS and "seed" not in RESULT_NEUTRAL_KEYS


def test_resume_of_a_finished_stage_with_other_data_or_lr_is_refused(tmp_path, tiny_model_dir):
    data = write_edit_data(tmp_path / "data")
    other = write_edit_data(tmp_path / "other", n_train=12)
    out = tmp_path / "sft"
    first = run_cli(*sft_args(data, out), timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    record = (out / "final" / "hs3_training.json").read_bytes()
    config = (out / "config.yaml").read_bytes()

    lr = compose("sft", []).train.lr
    for extra, named in ((["train.lr=3e-4"], f"train.lr: {lr} -> 0.0003"),
                         ([], "data (manifest sha256")):
        data_dir = data if extra else other
        proc = run_cli(*sft_args(data_dir, out, *extra), timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = proc.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert line.startswith(f"error: out={out}: was trained with other settings") and named in line, line
        # nothing was rewritten: the record still says what was trained
        assert (out / "final" / "hs3_training.json").read_bytes() == record
        assert (out / "config.yaml").read_bytes() == config

    # logging and checkpoint cadence do not change the result: the resume goes ahead
    same = run_cli(*sft_args(data, out, "train.logging_steps=2", "train.save_steps=2"), timeout=300)
    assert same.returncode == 0, same.stderr[-2000:]

    # resume=never starts over with the new settings and records them
    fresh = run_cli(*sft_args(other, out, "train.lr=3e-4", "resume=never"), timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert OmegaConf.load(out / "config.yaml").train.lr == pytest.approx(3e-4)


# ---- issue 18, item 11: resume trusts nothing it reads ---------------------------------------------
@pytest.fixture(scope="module")
def trained_sft(tmp_path_factory, tiny_model_dir, edit_data_dir):
    """An sft run of 2 steps with a checkpoint after each (and final/)."""
    out = tmp_path_factory.mktemp("trained") / "sft"
    proc = run_cli(*sft_args(edit_data_dir, out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _copy(out, tmp_path):
    import shutil

    target = tmp_path / "sft"
    shutil.copytree(out, target, symlinks=True)
    return target


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged, why", [
    ("trainer_state.json", "trainer_state.json cannot be read"),
    ("model.safetensors", "model.safetensors is truncated"),
    ("optimizer.pt", "optimizer.pt is truncated"),
])
def test_resume_passes_over_a_damaged_newest_checkpoint_and_says_why(trained_sft, edit_data_dir, tmp_path, damaged, why):
    """A node that crashed before its last checkpoint reached the disk: the rerun resumes from the newest
    intact one (checkpoint-1), says which it skipped and why, and trains step 2 again."""
    from recipes.training import checkpoint_problem

    out = _copy(trained_sft, tmp_path)
    _truncate(out / "checkpoint-2" / damaged)
    assert why in checkpoint_problem(out / "checkpoint-2")
    proc = run_cli(*sft_args(edit_data_dir, out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sft: skipping {out}/checkpoint-2: {why}" in proc.stderr
    assert f"sft: resuming from {out}/checkpoint-1" in proc.stderr
    assert checkpoint_problem(out / "checkpoint-2") is None  # written again by the resumed run
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def test_an_explicit_resume_from_a_damaged_checkpoint_is_one_line(trained_sft, edit_data_dir, tmp_path):
    out = _copy(trained_sft, tmp_path)
    _truncate(out / "checkpoint-1" / "trainer_state.json")
    proc = run_cli(*sft_args(edit_data_dir, out, f"resume={out}/checkpoint-1"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: resume={out}/checkpoint-1: cannot resume from it: trainer_state.json cannot be read")


@pytest.mark.parametrize("content", ["stage: sft\nmodel: {path: builtin", "\x00\x00\x00", "- just\n- a list\n"])
def test_a_damaged_config_yaml_in_out_is_one_line(trained_sft, edit_data_dir, tmp_path, content):
    out = _copy(trained_sft, tmp_path)
    (out / "config.yaml").write_text(content)
    proc = run_cli(*sft_args(edit_data_dir, out), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: out={out}: its config.yaml is damaged or not this project's (cannot read ")
    assert (out / "config.yaml").read_text() == content  # left as it was
