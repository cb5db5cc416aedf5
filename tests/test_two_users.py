"""Two users of one group share a run dir under umask 002 (issue 18, item 7): the second user's rerun of the
first one's finished sft died in save_final with a PermissionError traceback (chmod on the first user's
files), left no summary, and the pipeline reran it forever; OUT/.lock was 0644 whatever the umask; the
tiny-model cache was 0700/0600.

Real users: the test (run as root) creates a group and two users in it, runs each stage process as one of
them with setpriv (uid, gid, supplementary groups, no capabilities) under umask 002, and removes them
after. Skipped where it cannot create users."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, write_edit_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


@pytest.fixture
def two_users():
    if os.geteuid() != 0 or not all(_tool(t) for t in ("groupadd", "useradd", "userdel", "groupdel", "setpriv")):
        pytest.skip("needs root and groupadd/useradd/setpriv to create two users")
    tag = uuid.uuid4().hex[:6]
    group, users = f"hs3g{tag}", [f"hs3a{tag}", f"hs3b{tag}"]
    created = []
    try:
        subprocess.run([_tool("groupadd"), group], check=True, capture_output=True)
        created.append(("group", group))
        for user in users:
            subprocess.run([_tool("useradd"), "--no-create-home", "--gid", group, "--shell", "/bin/sh", user],
                           check=True, capture_output=True)
            created.append(("user", user))
        yield group, users
    finally:
        for kind, name in reversed(created):
            subprocess.run([_tool("userdel" if kind == "user" else "groupdel"), name], capture_output=True)


@pytest.fixture
def reachable_python():
    """The interpreter and the checkout must be reachable by other users. Where an ancestor dir is closed
    to them (a pyenv Python under /root, mode 0700), the test opens it for traversal only (o+x, no
    listing) while it runs and restores the exact mode after."""
    paths = {Path(os.path.realpath(sys.executable)), Path(sys.prefix), Path(sys.base_prefix), REPO_ROOT}
    changed = {}
    for path in paths:
        for parent in [path, *path.parents] if path.is_dir() else path.parents:
            mode = stat.S_IMODE(parent.stat().st_mode)
            if not mode & 0o001 and parent not in changed:
                changed[parent] = mode
    try:
        for parent, mode in changed.items():
            os.chmod(parent, mode | 0o001)
        yield
    finally:
        for parent, mode in changed.items():
            os.chmod(parent, mode)


def as_user(user: str, group: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`python ARGS` as `user` (its uid, the group, umask 002, no root capabilities)."""
    command = ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--inh-caps=-all",
               "--bounding-set=-all", "sh", "-c", 'umask 002 && exec "$@"', "sh", sys.executable, *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def modes(root: Path) -> dict[str, tuple[str, int]]:
    import pwd

    return {str(p.relative_to(root)): (pwd.getpwuid(p.lstat().st_uid).pw_name, stat.S_IMODE(p.lstat().st_mode))
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def test_a_second_user_of_the_group_resumes_the_first_users_run(two_users, reachable_python):
    group, (alice, bob) = two_users
    import grp

    gid = grp.getgrnam(group).gr_gid
    shared = Path(tempfile.mkdtemp(prefix="hs3-two-users-"))  # /tmp: outside root's private pytest dirs
    try:
        os.chown(shared, 0, gid)
        os.chmod(shared, 0o2770)  # the group's project dir (setgid: new files get the group)
        data = write_edit_data(shared / "data")
        for path in [data, *data.rglob("*")]:
            os.chown(path, 0, gid)
        homes = {}
        for user in (alice, bob):
            home = shared / f"home-{user}"
            home.mkdir()
            shutil.chown(home, user, group)
            homes[user] = home
        run_dir = shared / "run"
        cache = shared / "cache"  # the tiny-model cache, built by the first user (HS3_CACHE)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HS3_OUTPUT_LOCK"))}
        args = ["-m", "launcher", "sft", f"run_dir={run_dir}", f"data={data}", "train.max_steps=2", "train.save_steps=1",
                "train.eval_steps=1000"]

        def env(user):
            return {**base_env, "HOME": str(homes[user]), "HS3_CACHE": str(cache), "HF_HOME": str(homes[user] / "hf"),
                    "XDG_CACHE_HOME": str(homes[user] / "cache"), "MPLCONFIGDIR": str(homes[user] / "mpl"),
                    "TRITON_CACHE_DIR": str(homes[user] / "triton")}

        first = as_user(alice, group, args, env(alice))
        assert first.returncode == 0, first.stderr[-3000:]
        out = run_dir / "sft"
        assert (out / "summary.json").is_file() and not (out / ".lock").exists()
        # what the first user wrote, the group can read and write (umask 002): nothing owner-only
        for name, (owner, mode) in {**modes(out), **{f"cache/{k}": v for k, v in modes(cache).items()}}.items():
            assert owner == alice, (name, owner)
            assert mode & 0o060 == 0o060, f"{name}: {oct(mode)} is not group read-write"

        # the second user reruns the same command: it resumes from checkpoint-2 and saves final/ again
        second = as_user(bob, group, args, env(bob))
        assert second.returncode == 0, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert f"sft: resuming from {out}/checkpoint-2" in second.stderr
        summary = out / "summary.json"
        assert summary.is_file() and summary.stat().st_uid == __import__("pwd").getpwnam(bob).pw_uid
        # the first user's files were written to, never chmod-ed away from the group
        for name, (owner, mode) in modes(out).items():
            assert mode & 0o060 == 0o060, f"{name} ({owner}): {oct(mode)}"
        assert not (out / ".lock").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
