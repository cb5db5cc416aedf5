"""Each config mistake of a training stage: one line on stderr, exit 2, and nothing heavy loaded
(not even torch, let alone a model)."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli


def run_stage_cli(*args: str):
    """`python -m recipes ARGS`, reporting the exit code and whether torch was ever imported."""
    code = ("import sys\nfrom launcher.__main__ import main\n"
            f"rc = main({list(args)!r})\nprint(rc, 'torch' in sys.modules)")
    return run_cli("-c", code, timeout=120)


def write_previous_run(out, stage: str, model_path: str) -> None:
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(f"stage: {stage}\nmodel:\n  path: {model_path}\n")


CASES = {
    "unknown key": (["sft", "train.nope=1"], "unknown key train.nope"),
    "wrong type": (["sft", "train.micro_batch=two"], "train.micro_batch"),
    "missing data file": (["sft", "data=/nonexistent/data"], "missing data file /nonexistent/data/sft/train.jsonl"),
    "global batch not divisible": (["sft", "train.global_batch=5", "train.micro_batch=2"],
                                   "train.global_batch=5 is not divisible by train.micro_batch=2 x data-parallel size=1"),
    "rl batch is not prompts x k": (["rl", "train.global_batch=12", "train.micro_batch=4"],
                                    "train.global_batch=12 must equal rl.prompts_per_step=2 x rl.k=4 (= 8)"),
    "resume dir of another stage": (["sft", "out={prev}"], "holds a run with stage=rm, not stage=sft"),
    "resume dir of another model": (["sft", "out={prev_model}"], "holds a run with model.path=other/model, not model.path=builtin:tiny"),
    "missing init checkpoint": (["dpo", "init=/nonexistent/sft/final"], "init=/nonexistent/sft/final: no model there"),
}


@pytest.mark.parametrize("case", CASES)
def test_config_error_is_one_line_before_any_model(case, edit_data_dir, tmp_path):
    args, message = CASES[case]
    write_previous_run(tmp_path / "prev", "rm", "builtin:tiny")
    write_previous_run(tmp_path / "prev_model", "sft", "other/model")
    args = [a.format(prev=tmp_path / "prev", prev_model=tmp_path / "prev_model") for a in args]
    if not any(a.startswith("data=") for a in args):
        args.append(f"data={edit_data_dir}")
    args.append(f"run_dir={tmp_path / 'run'}")

    proc = run_stage_cli(*args)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize("model_path", ["nobody/no-such-model", "/nonexistent/model/dir"])
def test_a_model_that_cannot_be_loaded_is_one_line(model_path, edit_data_dir, tmp_path):
    """No such hub id (the hub is out of reach here, as on many clusters' compute nodes) or no such
    directory: one line naming the model, exit 2, not transformers' traceback."""
    proc = run_cli("-m", "launcher", "sft", f"model.path={model_path}", f"data={edit_data_dir}",
                   f"run_dir={tmp_path}", env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot load {model_path}: ")
    assert "Traceback" not in proc.stderr
