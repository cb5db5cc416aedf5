"""Atomic output writes: all or nothing, with the permissions of any other new file."""
from __future__ import annotations

import os

import pytest

from recipes.io import atomic_path, atomic_write_text


def test_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """On a shared cluster file system, teammates must be able to read the run's outputs."""
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.txt").read_text() == "x\n"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
