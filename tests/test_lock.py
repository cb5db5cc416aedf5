"""The output-dir lock under a real race: many processes start at one instant, exactly one holds the dir.

Each round, 8 processes wait for one "go" file (a barrier), then all call OutputLock(dir).acquire()
at once. Even rounds start on a stale lock file left by a killed holder (a dead PID), so taking
over a stale lock is raced too. A winner keeps the lock until every process has tried, so a late loser cannot take it
legitimately after a release; the test then counts the winners.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from recipes.preemption import LOCK_ENV, LOCK_FILE, OutputLock

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 8
ROUNDS = 10

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from hs3.io import UserError
    from recipes.preemption import OutputLock

    base, me, n, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for r in range(rounds):
        go = base / f"go-{r}"
        (base / f"ready-{r}-{me}").touch()
        while not os.path.exists(go):  # spin: all start within microseconds of each other
            pass
        lock = OutputLock(base / f"out-{r}")
        try:
            lock.acquire()
            won = True
        except UserError as exc:
            won = False
            assert "is being written by" in str(exc), exc
        # written whole, then renamed: the parent's glob never sees a half-written result
        (base / f"writing-{r}-{me}").write_text(json.dumps({"won": won, "pid": os.getpid()}))
        os.replace(base / f"writing-{r}-{me}", base / f"tried-{r}-{me}")
        if won:  # hold until everyone has tried, then release
            deadline = time.monotonic() + 60
            while len(list(base.glob(f"tried-{r}-*"))) < n and time.monotonic() < deadline:
                time.sleep(0.002)
            lock.release()
""")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(LOCK_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_exactly_one_of_many_simultaneous_starters_holds_the_dir(tmp_path, clean_env):
    env = {k: v for k, v in os.environ.items() if k not in (LOCK_ENV, "SLURM_JOB_ID")}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(i), str(PROCESSES), str(ROUNDS)],
                              env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for r in range(0, ROUNDS, 2):  # the lock file of a holder killed by -9
        (tmp_path / f"out-{r}").mkdir()
        (tmp_path / f"out-{r}" / LOCK_FILE).write_text(json.dumps({"job_id": None, "host": os.uname().nodename,
                                                                   "pid": int(dead.stdout)}))
    try:
        for r in range(ROUNDS):
            deadline = time.monotonic() + 180  # (the starters are interpreters importing torch: minutes on a busy 2-core machine)
            while len(list(tmp_path.glob(f"ready-{r}-*"))) < PROCESSES:  # all are spinning on the barrier
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
                time.sleep(0.005)
            (tmp_path / f"go-{r}").touch()
            while len(list(tmp_path.glob(f"tried-{r}-*"))) < PROCESSES:
                assert time.monotonic() < deadline and all(p.poll() in (None, 0) for p in procs), \
                    [p.stderr.read() for p in procs if p.poll()]
                time.sleep(0.005)
            won = [json.loads(p.read_text())["won"] for p in tmp_path.glob(f"tried-{r}-*")]
            assert won.count(True) == 1, f"round {r}: {won.count(True)} of {PROCESSES} processes hold the dir"
        for p in procs:
            assert p.wait(timeout=60) == 0, p.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r in range(ROUNDS):  # every winner released: no lock file is left behind
        assert not (tmp_path / f"out-{r}" / LOCK_FILE).exists()


def test_a_killed_holder_releases_the_lock_and_the_next_start_takes_it(tmp_path, clean_env):
    env = {k: v for k, v in os.environ.items() if k not in (LOCK_ENV, "SLURM_JOB_ID")}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from recipes.preemption import OutputLock; "
                               "OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert OutputLock(tmp_path).holder() == f"process {holder.pid} on {os.uname().nodename}"
        with pytest.raises(Exception, match=f"is being written by process {holder.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9: no release ran, the file still names the dead holder
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    assert OutputLock(tmp_path).holder() is None
    with OutputLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_an_out_dir_that_cannot_hold_the_lock_is_one_line(tmp_path, clean_env):
    (tmp_path / "file").write_text("not a dir")
    with pytest.raises(Exception) as caught:
        OutputLock(tmp_path / "file" / "sft").acquire()
    assert type(caught.value).__name__ == "UserError" and str(caught.value).startswith("cannot lock ")
    assert "\n" not in str(caught.value)


HOLD = ("import sys, time; from recipes.preemption import OutputLock; "
        "OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
TRY = "import sys; from recipes.preemption import OutputLock; OutputLock(sys.argv[1]).acquire(); print('joined')"


def _env(**slurm) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (LOCK_ENV, "SLURM_JOB_ID", "SLURM_STEP_ID", "HS3_UNDER_ACCELERATE", "RANK")}
    return {**env, "PYTHONPATH": str(ROOT), **slurm}


@pytest.mark.parametrize("holder_env, second_env, joins", [
    # two runs in one salloc shell: the same SLURM_JOB_ID, no step (issue 18, item 3: both held it)
    ({"SLURM_JOB_ID": "5"}, {"SLURM_JOB_ID": "5"}, False),
    # two srun steps of one job
    ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0"}, {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "1"}, False),
    # two accelerate launches in two srun steps of one job
    ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "HS3_UNDER_ACCELERATE": "1", "RANK": "0"},
     {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "1", "HS3_UNDER_ACCELERATE": "1", "RANK": "0"}, False),
    # the ranks of one accelerate launch in one step (another node's rank): one writer
    ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "HS3_UNDER_ACCELERATE": "1", "RANK": "0"},
     {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "HS3_UNDER_ACCELERATE": "1", "RANK": "3"}, True),
])
def test_a_slurm_job_id_alone_is_no_identity(tmp_path, clean_env, holder_env, second_env, joins):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=_env(**holder_env), cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (owner["host"], owner["pid"], owner["job_id"]) == (os.uname().nodename, holder.pid, "5")
        assert owner["start"] and owner["start"] == Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        second = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], env=_env(**second_env), cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        if joins:
            assert second.returncode == 0 and "joined" in second.stdout, second.stderr
        else:
            assert second.returncode != 0 and "joined" not in second.stdout
            assert f"is being written by process {holder.pid} on {os.uname().nodename} (SLURM job 5" in second.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_second_sft_in_the_same_slurm_job_is_refused_through_the_cli(tmp_path, clean_env, edit_data_dir):
    """The way it was found: a run holds OUT in an salloc shell; a second `launcher sft` there (same
    SLURM_JOB_ID) must be refused before it loads anything, not "resume" while the first one writes."""
    out = tmp_path / "sft"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=_env(SLURM_JOB_ID="5"), cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "launcher", "sft", f"out={out}", f"data={edit_data_dir}",
                               "train.max_steps=1"], env=_env(SLURM_JOB_ID="5"), cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip() == (f"error: {out} is being written by process {holder.pid} on {os.uname().nodename} "
                                       f"(SLURM job 5) (lock {out / LOCK_FILE}; delete it if that is wrong)")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_file_follows_the_umask(tmp_path, clean_env):
    old = os.umask(0o002)
    try:
        with OutputLock(tmp_path / "out"):
            assert (tmp_path / "out" / LOCK_FILE).stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
