"""Atomic output writes: all or nothing, with the permissions of any other new file."""
from __future__ import annotations

import os

import pytest

from hs3.io import atomic_path, atomic_write_text


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


def test_follow_umask_gives_owner_only_outputs_the_usual_mode(tmp_path):
    import os
    import stat

    from hs3.io import follow_umask

    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "model.safetensors").write_bytes(b"x")
    os.chmod(tmp_path / "d" / "model.safetensors", 0o600)  # what safetensors' save_file leaves
    old = os.umask(0o027)
    try:
        follow_umask(tmp_path / "d")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "d" / "model.safetensors").stat().st_mode) == 0o640


def test_pid_alive_tells_a_running_process_from_a_finished_one():
    import os
    import subprocess
    import sys

    from hs3.io import pid_alive

    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_follow_umask_changes_only_this_users_files(tmp_path):
    """In a group-shared run dir, another member's files are theirs: chmod on them fails for a non-root
    user (the PermissionError of issue 18, item 7), so they are left as they are."""
    import stat

    from hs3.io import follow_umask

    (tmp_path / "d").mkdir()
    mine, theirs = tmp_path / "d" / "mine.safetensors", tmp_path / "d" / "theirs.safetensors"
    for path in (mine, theirs):
        path.write_bytes(b"x")
        os.chmod(path, 0o600)
    os.chown(theirs, 65534, 65534)
    old = os.umask(0o002)
    try:
        follow_umask(tmp_path / "d")
    finally:
        os.umask(old)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o664
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o600


def test_truncated_tells_a_whole_checkpoint_file_from_a_cut_one(tmp_path):
    import torch
    from safetensors.torch import save_file

    from hs3.io import truncated

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    torch.save({"step": torch.arange(1000)}, tmp_path / "optimizer.pt")
    assert truncated(tmp_path / "model.safetensors") is None and truncated(tmp_path / "optimizer.pt") is None
    for name in ("model.safetensors", "optimizer.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:-100])
        assert truncated(tmp_path / name).startswith(f"{name} is truncated")
