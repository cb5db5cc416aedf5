"""Config mistakes that once gave a traceback or a wrong success (issue 11, item 8): each is one
`error:` line, exit 2, before anything is written (no OUT/config.yaml), run in-process."""
from __future__ import annotations

import pytest

from launcher.__main__ import main
from tests.conftest import write_edit_data

CASES = {
    "seq_len 0": (["train.seq_len=0"], "train.seq_len=0 must be >= 1"),
    "bogus scheduler": (["train.lr_scheduler=bogus"], "train.lr_scheduler=bogus: not one of linear, cosine"),
    "no processes": (["hf.num_processes=0"], "hf.num_processes=0 must be >= 1"),
    "bogus attention": (["model.attn_implementation=bogus"], "model.attn_implementation=bogus: not one of eager, sdpa"),
    "LoRA targets match nothing": (["peft.enabled=true", "peft.target_modules=[qkv_proj,q_proj]"],
                                   "peft.target_modules: qkv_proj match no linear layer"),
    "model dir without a model": (["model={empty_dir}"], "cannot load {empty_dir}: no model there (no config.json"),
    "typo'd model path": (["model={empty_dir}/../modle"], "no such directory"),
    "empty training split": (["data={empty_data}"], "sft/train.jsonl has no rows (an empty training split"),
    "negative epochs": (["train.epochs=-1"], "train.epochs=-1.0 must be > 0"),
    "zero max_steps": (["train.max_steps=0"], "train.max_steps=0 must be -1"),
    "wandb without its key": (["train.report_to=wandb"], "needs WANDB_API_KEY in the environment"),
    "unknown reporter": (["train.report_to=tensorbored"], "tensorbored is not one of tensorboard, wandb, none"),
}


@pytest.mark.parametrize("case", CASES)
def test_config_gap_is_one_line_and_writes_nothing(case, edit_data_dir, tmp_path, capsys, monkeypatch, tiny_model_dir):
    # tiny_model_dir: the tiny model is built (and cached) first, so the first build's own progress bars
    # (a fresh clone's first LoRA check loads it) are not mistaken for the error's output.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    empty_dir = tmp_path / "empty_model"
    empty_dir.mkdir()
    empty_data = write_edit_data(tmp_path / "empty_data")
    (empty_data / "sft" / "train.jsonl").write_text("\n")
    args, message = CASES[case]
    args = [a.format(empty_dir=empty_dir, empty_data=empty_data) for a in args]
    if not any(a.startswith("data=") for a in args):
        args.append(f"data={edit_data_dir}")
    out = tmp_path / "run" / "sft"
    rc = main(["sft", *args, f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message.format(empty_dir=empty_dir) in err, err
    assert not (out / "config.yaml").exists()  # the corrected command is not refused later


def test_the_corrected_command_runs_after_a_typo(edit_data_dir, tmp_path, tiny_model_dir, capsys):
    run = f"run_dir={tmp_path / 'run'}"
    assert main(["sft", f"model={tmp_path}/tiny-modle", f"data={edit_data_dir}", run, "--dry-run"]) == 2
    assert main(["sft", f"model={tiny_model_dir}", f"data={edit_data_dir}", run, "train.max_steps=1",
                 "train.eval_steps=1000"]) == 0, capsys.readouterr().err[-2000:]
