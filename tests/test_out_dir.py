"""A training stage writes only into a new or empty dir, or into its own earlier run (issue 18, item 4 and
the final/ symlink of item 14): `sft out=/` wrote checkpoints, final/ and a README.md into /; a user's
README.md in OUT was replaced by TRL's model card. Each refusal is one line, exit 2, before anything is
written (not even OUT/.lock); what the user had is left byte for byte."""
from __future__ import annotations

import pytest

from recipes.config import ConfigError, compose, to_yaml
from recipes.preemption import TRL_CARD_LINE, check_output_dir_is_ours

from .conftest import run_cli


def snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


def test_the_root_dir_is_refused():
    with pytest.raises(ConfigError, match=r"^out=/: holds files this project did not write \("):
        check_output_dir_is_ours("/")


def _ours(out, stage="sft") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(compose(stage, [f"out={out}"])))


CASES = {
    "a user's README.md": (lambda out: (out / "README.md").write_text("# my notes\n"),
                           "holds files this project did not write (README.md)"),
    "a user's files and dirs": (lambda out: ((out / "data").mkdir(), (out / "notes.txt").write_text("x")),
                                "holds files this project did not write (data, notes.txt)"),
    "someone else's config.yaml": (lambda out: (out / "config.yaml").write_text("learning_rate: 3\n"),
                                   "its config.yaml is not a stage config of this project"),
    "our run with a user's README.md": (lambda out: (_ours(out), (out / "README.md").write_text("# mine\n")),
                                        "holds a README.md that is not TRL's model card"),
    "final/ a symlink": (lambda out: (_ours(out), (out / "final").symlink_to(out.parent / "elsewhere")),
                         "final is a symlink (to "),
}


@pytest.mark.parametrize("case", CASES)
def test_a_dir_holding_what_this_project_did_not_write_is_refused(case, edit_data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.bin").write_bytes(b"\x01\x02")
    make, message = CASES[case]
    make(out)
    before = snapshot(tmp_path)
    proc = run_cli("-m", "launcher", "sft", f"out={out}", f"data={edit_data_dir}", "train.max_steps=1", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: out={out}: "), proc.stderr
    assert message in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before  # nothing written, nothing removed (no .lock either)


def test_new_empty_and_own_dirs_pass(tmp_path):
    check_output_dir_is_ours(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_output_dir_is_ours(tmp_path / "empty")
    own = tmp_path / "own"
    _ours(own)
    for name in ("checkpoint-1", "final", "tensorboard"):
        (own / name).mkdir()
    (own / "README.md").write_text(f"---\nlibrary_name: transformers\n---\n{TRL_CARD_LINE}\n")  # TRL's card of a checkpoint
    check_output_dir_is_ours(own)
    locked = tmp_path / "locked"  # what a stage writes before its config.yaml
    locked.mkdir()
    (locked / ".lock").write_text("{}")
    (locked / "PREEMPT_REQUEST").touch()
    check_output_dir_is_ours(locked)


def test_the_megatron_render_refuses_a_foreign_dir_before_writing(tmp_path):
    from recipes.megatron import build_command

    out = tmp_path / "docs"
    out.mkdir()
    (out / "thesis.tex").write_text("\\documentclass{article}")
    cfg = compose("sft", ["engine=megatron", f"out={out}"])
    with pytest.raises(ConfigError, match="holds files this project did not write \\(thesis.tex\\)"):
        build_command(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
