"""A training stage whose loss or weights stop being finite stops with exit 2 and one line, keeps its
good checkpoints, writes no non-finite checkpoint, no final/ and no summary.json (issue 18, item 6:
train.lr=inf gave a final/ whose 20 of 20 tensors were NaN, exit 0; values like that are now refused
by the config, so divergence is brought about here the ways it still happens: a damaged starting
checkpoint, and weights that become NaN in the middle of a run)."""
from __future__ import annotations

import json
import math

import pytest

from hs3.io import truncated
from launcher.__main__ import main
from recipes import training


def _finite_checkpoint(path) -> bool:
    from safetensors.torch import load_file

    assert truncated(path / "model.safetensors") is None
    return all(bool(t.isfinite().all()) for t in load_file(path / "model.safetensors").values())


def test_a_nan_loss_from_the_first_step_stops_the_stage_through_the_cli(tiny_model_dir, edit_data_dir, tmp_path):
    """A starting checkpoint with one NaN weight (a damaged init): every loss is NaN."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conftest import run_cli

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    damaged = tmp_path / "damaged_init"
    model.save_pretrained(damaged)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(damaged)
    out = tmp_path / "sft"
    proc = run_cli("-m", "launcher", "sft", f"model={damaged}", f"data={edit_data_dir}", f"out={out}",
                   "train.max_steps=3", "train.save_steps=1000", "train.eval_steps=1000", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].split("error: ", 1)[1].startswith(
        "sft: the training loss is nan at step 1: stopped without saving (no checkpoint was written; no final/ "
        "written)"), repr(proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert not list(out.glob("checkpoint-*"))


class _Diverge:
    """Fault injection: the weights become NaN right after the optimizer step of step `at` (as a real
    divergence does between two logged losses)."""

    def __init__(self, at: int):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_optimizer_step(self, args, state, control, model=None, **kwargs):
                if state.global_step + 1 == outer.at:  # global_step is incremented after this event
                    import torch

                    with torch.no_grad():
                        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

        self.at = at
        self.callback = Callback()


@pytest.mark.parametrize("logging_steps, save_steps, at, caught_by, kept", [
    # NaN weights after step 4's update; step 5's logged loss is NaN (no checkpoint in between)
    (1, 3, 4, "the training loss is nan at step 5", ["checkpoint-3"]),
    # NaN weights after step 3's update, nothing logged: caught by the check before step 3's checkpoint
    (10, 1, 3, "the weights are no longer finite at step 3", ["checkpoint-1", "checkpoint-2"]),
])
def test_divergence_in_the_middle_keeps_the_good_checkpoints(tiny_model_dir, edit_data_dir, tmp_path, monkeypatch,
                                                             capsys, logging_steps, save_steps, at, caught_by, kept):
    """The run stops at the first sign, before anything non-finite is saved; the checkpoints written
    before stay, finite, and the message names the newest."""
    diverge = _Diverge(at=at)
    callbacks = training.callbacks
    monkeypatch.setattr(training, "callbacks", lambda cfg: [*callbacks(cfg), diverge.callback])
    out = tmp_path / "sft"
    rc = main(["sft", f"model={tiny_model_dir}", f"data={edit_data_dir}", f"out={out}", "train.max_steps=6",
               f"train.save_steps={save_steps}", "train.save_total_limit=5", f"train.logging_steps={logging_steps}",
               "train.eval_steps=1000"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    errors = [line.split("error: ", 1)[1] for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1, err[-3000:]
    last = errors[0]
    assert caught_by in last and f"the last good checkpoint is {out / kept[-1]};" in last, last
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == kept
    assert all(_finite_checkpoint(out / name) for name in kept)
    state = json.loads((out / kept[-1] / "trainer_state.json").read_text())
    assert all(math.isfinite(e.get("loss", 0.0)) for e in state["log_history"])
