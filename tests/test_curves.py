"""Observability (issue 11): TensorBoard logs by default, OUT/curves.png at the end of a stage,
progress.json for `./launch.sh status RUN_DIR` (step / total, ETA); and outputs that follow the umask
(item 6: safetensors writes 0600)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from recipes import curves
from recipes.config import compose
from tests.conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rl_curves_have_reward_kl_and_copy_rate_panels(tmp_path):
    history = [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-5, "grad_norm": 0.5 + s, "reward": 0.1 * s,
                "kl": 0.01 * s, "copy_rate": 0.5 - 0.05 * s, "epoch": s / 10} for s in range(1, 6)]
    history.append({"step": 5, "eval_loss": 0.3, "eval_accuracy": 0.7})
    history.append({"step": 5, "train_runtime": 12.0, "train_loss": 0.4})
    titles = curves.plot_curves(history, tmp_path / "curves.png")
    assert titles == ["loss", "learning rate", "grad norm", "reward", "KL", "copy rate", "eval accuracy"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_progress_and_eta_from_the_trainer_state(tmp_path):
    from transformers import TrainerState

    observer = curves.RunObserver(tmp_path, "sft")
    state = TrainerState(global_step=10, max_steps=100)
    observer.on_train_begin(None, state, None)
    observer.start -= 60  # 60 s ago, at step 10
    state.global_step = 40
    observer.on_log(None, state, None, logs={"loss": 1.0})
    progress = curves.read_progress(tmp_path)
    assert progress["step"] == 40 and progress["max_steps"] == 100 and not progress["finished"]
    assert progress["eta_s"] == pytest.approx(120, abs=2)  # 30 steps in 60 s, 60 steps to go
    assert curves.describe_progress(progress, now=progress["updated"]) == "step 40/100 (40%), 1m00s elapsed, ETA 2m00s"

    (tmp_path / "run" / "sft").mkdir(parents=True)
    (tmp_path / "run" / "sft" / "progress.json").write_text(json.dumps(progress))
    status = run_cli("-m", "launcher", "status", str(tmp_path / "run"), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["stages"][0]["progress"].startswith("step 40/100 (40%), 1m00s elapsed, ETA ")


def test_report_to_choices(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    cfg = compose("sft", [f"run_dir={tmp_path}"])
    assert cfg.train.report_to == "tensorboard"
    assert curves.report_to(cfg) == ["tensorboard"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "sft" / "tensorboard")
    assert curves.report_to(compose("sft", ["train.report_to=none"])) == ["none"]
    monkeypatch.setenv("WANDB_API_KEY", "secret-not-to-be-written")
    cfg = compose("sft", [f"run_dir={tmp_path}", "train.report_to=tensorboard,wandb"])
    import importlib.util

    from recipes.config import ConfigError

    if importlib.util.find_spec("wandb") is None:  # not in any extra: a one-line error, not transformers' traceback
        with pytest.raises(ConfigError, match="the wandb package is not installed"):
            curves.report_to(cfg)
    else:
        assert curves.report_to(cfg) == ["tensorboard", "wandb"]
    from recipes.config import to_yaml
    assert "secret-not-to-be-written" not in to_yaml(cfg)


def test_a_stage_writes_tensorboard_curves_progress_and_umask_modes(edit_data_dir, tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = run_cli("-c", "import os, sys; os.umask(0o022); from launcher.__main__ import main; "
                   f"sys.exit(main(['sft', 'data={edit_data_dir}', 'run_dir={run_dir}', 'train.max_steps=3', "
                   "'train.save_steps=2', 'train.eval_steps=2']))", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = run_dir / "sft"
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    progress = curves.read_progress(out)
    assert progress["step"] == progress["max_steps"] == 3 and progress["finished"]
    status = run_cli("-m", "launcher", "status", str(run_dir), "--json")
    row = json.loads(status.stdout)["stages"][0]
    assert row["progress"].startswith("step 3/3 (100%)") and row["state"] == "finished"
    for weights in (out / "final" / "model.safetensors", out / "checkpoint-2" / "model.safetensors"):
        assert stat.S_IMODE(weights.stat().st_mode) == 0o644, weights  # safetensors alone writes 0600
