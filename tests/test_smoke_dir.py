"""The smoke's run dir (issue 18 item 1): it deletes a run dir only when an earlier smoke created it and
said so (the .hs3-smoke file), never through a symbolic link, and `--dry-run` changes nothing on disk."""
from __future__ import annotations

import json

import pytest

from hs3.io import UserError
from launcher.pipeline import SMOKE_MARKER, prepare_smoke_dir

from .conftest import run_cli


def tree(root) -> dict:
    """Every path under root (links not followed) -> file text, link target or 'dir'."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = (f"-> {path.readlink()}" if path.is_symlink() else
                    "dir" if path.is_dir() else path.read_text())
    return out


def smoke_dry_run(run_dir):
    return run_cli("-m", "launcher", "smoke", f"run_dir={run_dir}", "--dry-run", timeout=300)


def test_dry_run_keeps_a_users_dir_named_smoke_and_a_link_target(tmp_path):
    mine = tmp_path / "my_smoke_results"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (tmp_path / "linked_smoke").symlink_to(mine)
    before = tree(tmp_path)

    for run_dir, message in ((mine, "was not created by the smoke"), (tmp_path / "linked_smoke", "is a symbolic link")):
        proc = smoke_dry_run(run_dir)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert tree(tmp_path) == before  # nothing deleted, nothing written


def test_dry_run_of_a_smoke_made_dir_and_of_a_new_dir_writes_nothing(tmp_path):
    made = tmp_path / "smoke"
    (made / "sft").mkdir(parents=True)
    (made / SMOKE_MARKER).write_text("{}")
    (made / "sft" / "summary.json").write_text("{}")
    before = tree(tmp_path)
    proc = smoke_dry_run(made)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "would be cleared" in proc.stdout
    proc = smoke_dry_run(tmp_path / "fresh")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tree(tmp_path) == before


def test_a_real_start_clears_only_what_the_smoke_made(tmp_path):
    made = tmp_path / "a"
    prepare_smoke_dir(made, dry_run=False)  # new: created and marked
    assert json.loads((made / SMOKE_MARKER).read_text())["created_by"] == "./launch.sh smoke"
    (made / "sft").mkdir()
    (made / "sft" / "old.txt").write_text("from the last smoke")
    prepare_smoke_dir(made, dry_run=False)  # marked: cleared and marked again
    assert sorted(p.name for p in made.iterdir()) == [SMOKE_MARKER]

    empty = tmp_path / "b"
    empty.mkdir()
    prepare_smoke_dir(empty, dry_run=False)  # an empty dir of the user's: used, nothing to delete
    assert (empty / SMOKE_MARKER).is_file()

    target = tmp_path / "target"
    target.mkdir()
    (target / SMOKE_MARKER).write_text("{}")  # even a marked target is not cleared through a link
    (target / "keep.txt").write_text("x")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        prepare_smoke_dir(tmp_path / "link", dry_run=False)
    assert (target / "keep.txt").read_text() == "x"

    a_file = tmp_path / "file_smoke"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        prepare_smoke_dir(a_file, dry_run=False)
