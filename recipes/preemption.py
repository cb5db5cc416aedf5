"""Preemption and time limits: checkpoint, exit "requeue me", resume; and one writer per output dir.

How a stage is stopped early (SLURM sends USR1 `cluster.signal_seconds` before the time limit,
`--signal=B:USR1@N`, to the batch script; see recipes/slurm.py):

  1. the batch script's USR1 trap writes the request file OUT/PREEMPT_REQUEST_FILE (a file reaches
     every rank on every node, and launchers such as `accelerate launch` do not forward USR1);
     a stage process started by hand can instead be sent USR1 directly (`kill -USR1 PID`);
  2. `PreemptionCallback` (add it to any transformers/TRL Trainer) sees the request at the end of the
     current optimizer step, on every rank at the same step, and asks the Trainer to save a
     checkpoint and stop;
  3. at the end of training it writes OUT/PREEMPTED_MARKER_FILE and exits with PREEMPTED_EXIT_CODE;
  4. the batch script sees the code (or the marker, when a launcher hid the code) and requeues the
     job; the restarted job resumes from the latest checkpoint-N (resume=auto).

The output-dir lock (`OutputLock`, OUT/LOCK_FILE) keeps two jobs or processes from writing one
output dir. It holds the SLURM job id (inside a job) or the host and PID. A lock whose job is no
longer queued or running, or whose local PID is dead, is stale and taken over. A requeued job
(same job id) and the child processes of the holder (they inherit LOCK_ENV) hold it already.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from recipes.io import UserError, atomic_write_json

# Stages that train: they checkpoint, can be preempted and resume, and lock their output dir.
TRAINING_STAGES = ("sft", "rm", "rl", "dpo")
# EX_TEMPFAIL (sysexits.h): "temporary failure, retry later" = preempted, checkpoint saved, requeue me.
PREEMPTED_EXIT_CODE = 75
PREEMPT_REQUEST_FILE = "PREEMPT_REQUEST"
PREEMPTED_MARKER_FILE = "PREEMPTED"
LOCK_FILE = ".lock"
LOCK_ENV = "HS3_OUTPUT_LOCK"  # the holder's token, inherited by the processes it starts

# SLURM job states in which a job may still write its output dir.
LIVE_JOB_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                   "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}

_requested = False
_installed = False


def _on_usr1(signum, frame) -> None:
    global _requested
    _requested = True


def install_signal_handler() -> None:
    """SIGUSR1 -> preemption requested. Idempotent: installed once per stage process."""
    global _installed
    if not _installed:
        signal.signal(signal.SIGUSR1, _on_usr1)
        _installed = True


def preemption_requested(out: str | os.PathLike | None = None) -> bool:
    """True once USR1 arrived, or the batch script wrote OUT/PREEMPT_REQUEST_FILE."""
    return _requested or (out is not None and (Path(out) / PREEMPT_REQUEST_FILE).exists())


def clear_request(out: str | os.PathLike) -> None:
    """Forget an old request (a restarted job must not stop at its first step)."""
    global _requested
    _requested = False
    (Path(out) / PREEMPT_REQUEST_FILE).unlink(missing_ok=True)
    (Path(out) / PREEMPTED_MARKER_FILE).unlink(missing_ok=True)


def _make_callback_class():
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):
        """On a preemption request: save a checkpoint at the end of this step, stop, exit 75.

        `out` is the stage's output dir (cfg.out), where the batch script writes the request file.
        """

        def __init__(self, out: str | os.PathLike):
            self.out = Path(out)
            self.stopped_at: int | None = None

        def _agreed(self, args) -> bool:
            """Every rank must stop at the same step, or the checkpoint's collectives hang."""
            flag = preemption_requested(self.out)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                import torch

                tensor = torch.tensor([int(flag)], device=args.device)
                dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
                flag = bool(tensor.item())
            return flag

        def on_step_end(self, args, state, control, **kwargs):
            if self.stopped_at is None and self._agreed(args):
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self.stopped_at is None:
                return control
            if state.is_world_process_zero:
                atomic_write_json(self.out / PREEMPTED_MARKER_FILE, {"step": self.stopped_at})
                (self.out / PREEMPT_REQUEST_FILE).unlink(missing_ok=True)
            print(f"preempted: checkpoint-{self.stopped_at} saved in {self.out}; exiting with code "
                  f"{PREEMPTED_EXIT_CODE} (requeue or rerun to resume)", file=sys.stderr, flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)

    return PreemptionCallback


def __getattr__(name):
    # transformers is imported only when a trainer asks for the callback.
    if name == "PreemptionCallback":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


# ---- the output-dir lock ----------------------------------------------------------------------

def _my_identity() -> dict:
    job_id = os.environ.get("SLURM_JOB_ID")
    return {"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid()}


def _token(owner: dict) -> str:
    return f"job:{owner['job_id']}" if owner.get("job_id") else f"pid:{owner['host']}:{owner['pid']}"


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from `scontrol show job` (works without accounting); None if unknown to SLURM."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    for item in proc.stdout.split():
        if item.startswith("JobState="):
            return item.split("=", 1)[1]
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _holder_alive(owner: dict) -> bool:
    if owner.get("job_id"):
        state = slurm_job_state(owner["job_id"])
        return state in LIVE_JOB_STATES
    if owner.get("host") == socket.gethostname():
        return _pid_alive(int(owner.get("pid", 0)))
    return True  # a PID on another host cannot be checked from here: assume it is alive


class OutputLock:
    """`with OutputLock(cfg.out):` around a stage run. A one-line UserError if another live job or
    process holds the dir."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out) / LOCK_FILE
        self.created = False

    def _describe(self, owner: dict) -> str:
        if owner.get("job_id"):
            return f"SLURM job {owner['job_id']}"
        return f"process {owner.get('pid')} on {owner.get('host')}"

    def holder(self) -> str | None:
        """Who holds the lock, when that is another live job or process (None: free, stale or ours)."""
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not owner or _token(owner) in (_token(_my_identity()), os.environ.get(LOCK_ENV)):
            return None
        return self._describe(owner) if _holder_alive(owner) else None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _my_identity()
        inherited = os.environ.get(LOCK_ENV)
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            owner = None
        except (OSError, ValueError):
            owner = {}  # unreadable or half-written: treat as stale
        if owner:
            token = _token(owner)
            if token == inherited:
                return self  # a child process of the holder
            if token == _token(me):  # our own job, requeued
                os.environ[LOCK_ENV] = token
                self.created = True
                return self
            if _holder_alive(owner):
                raise UserError(f"{self.path.parent} is being written by {self._describe(owner)} "
                                f"(lock {self.path}; delete it if that is wrong)")
        if owner is not None:
            atomic_write_json(self.path, me)  # take over the stale lock
        else:
            try:  # O_EXCL: of two processes starting at once, exactly one creates the lock
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return self.acquire()
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        os.environ[LOCK_ENV] = _token(me)
        self.created = True
        return self

    def release(self) -> None:
        if not self.created:
            return
        try:
            if _token(json.loads(self.path.read_text())) == _token(_my_identity()):
                self.path.unlink()
        except (OSError, ValueError):
            pass
        if os.environ.get(LOCK_ENV) == _token(_my_identity()):
            del os.environ[LOCK_ENV]
        self.created = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
