"""Preemption and time limits: checkpoint, exit "requeue me", resume; and one writer per output dir.

How a stage is stopped early (SLURM sends USR1 `cluster.signal_seconds` before the time limit,
`--signal=B:USR1@N`, to the batch script; see launcher/slurm.py):

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
output dir: an OS lock (flock) on the open file, held for the whole run and released by the kernel
when the holder exits or dies. The file names the holder: host, PID and the process's start time (a
PID is reused; the pair is not), and its SLURM job and step for messages. Who may join a held lock:
the holder's child processes (they inherit LOCK_ENV: accelerate ranks started by the stage), and the
ranks of the same distributed launch inside one SLURM job step (an HF job's `accelerate launch` on each
node: same job id, same step id). A SLURM job id alone is no identity: two srun steps of one job, or
two runs in one salloc shell, are two writers.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hs3.io import UserError, atomic_write_json

# Stages that train: they checkpoint, can be preempted and resume, and lock their output dir.
TRAINING_STAGES = ("sft", "rm", "rl", "dpo", "feedback", "select")
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


def run_guarded(cfg, runner):
    """Run a stage's runner on this machine with what every training stage needs: an output dir that is
    new, empty or one of ours (check_output_dir_is_ours); SIGUSR1 / the batch script's request file ->
    checkpoint, exit 75, requeue; and one writer per output dir (OutputLock).
    Other stages (data, eval, its, convert) and dry runs run as they are."""
    if cfg.stage not in TRAINING_STAGES or cfg.dry_run:
        return runner(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one rank checks: the others may already be writing into OUT
        check_output_dir_is_ours(cfg.out)
    install_signal_handler()
    with OutputLock(cfg.out):
        if "SLURM_JOB_ID" not in os.environ:  # in a job, the batch script clears it before starting
            clear_request(cfg.out)
        return runner(cfg)


# What a stage may have written into OUT before its config.yaml (the lock, the batch script's request
# file and the preemption marker). Once OUT/config.yaml (the resolved config, written first) is there,
# the dir is a run of ours and the resume checks (recipes.training.check_output_dir) decide.
BEFORE_CONFIG = (LOCK_FILE, PREEMPT_REQUEST_FILE, PREEMPTED_MARKER_FILE)
# TRL writes a model card, OUT/README.md, with every checkpoint (trl/trainer/base_trainer.py
# create_model_card, trl/templates/lm_model_card.md): one that carries this line is TRL's.
TRL_CARD_LINE = "It has been trained using [TRL](https://github.com/huggingface/trl)."
# Dirs a stage writes itself: never through a symlink a user put there.
STAGE_DIRS = ("final", "adapter")


def out_dir_names(out: Path) -> list[str] | None:
    """The names in an existing output dir (sorted), None when it does not exist yet; a one-line ConfigError
    for a dangling symlink, a file, or a dir that cannot be listed. The first step of every stage's out= check."""
    from recipes.config import ConfigError

    if out.is_symlink() and not out.exists():
        raise ConfigError(f"out={out}: a symlink to nothing ({os.readlink(out)})")
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"out={out}: exists and is not a directory")
    try:
        return sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise ConfigError(f"out={out}: cannot list it: {exc.strerror or exc}") from None


def check_output_dir_is_ours(out: str | os.PathLike) -> None:
    """Refuse (one-line ConfigError, before anything is written) an OUT that exists and holds anything this
    project did not write: `out=/`, a dir with the user's files, a config.yaml that is not a stage's config,
    a README.md that is not TRL's card (TRL would replace it), final/ or adapter/ as a symlink (the stage
    would write through it into the link's target). New, empty and our own dirs pass."""
    from recipes.config import STAGES, ConfigError, load_yaml

    out = Path(out)
    names = out_dir_names(out)
    if names is None:
        return
    if "config.yaml" in names:
        try:
            previous = load_yaml(out / "config.yaml")
        except ConfigError as exc:
            raise ConfigError(f"out={out}: its config.yaml is damaged or not this project's ({exc}); move it away or "
                              "pick another out=") from None
        if previous.get("stage") not in STAGES:
            raise ConfigError(f"out={out}: its config.yaml is not a stage config of this project (no stage: key); "
                              "pick another out= (a new or empty dir)")
    else:  # (".config.yaml.XXXX": the atomic write of config.yaml, under way)
        foreign = [name for name in names if name not in BEFORE_CONFIG and not name.startswith(".config.yaml.")]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"out={out}: holds files this project did not write ({shown}); a stage writes only "
                              "into a new or empty dir, or into its own earlier run (pick another out= or run_dir=)")
    readme = out / "README.md"
    if readme.exists():
        try:
            trl_card = readme.is_file() and TRL_CARD_LINE in readme.read_text(encoding="utf-8", errors="replace")
        except OSError:
            trl_card = False
        if not trl_card:
            raise ConfigError(f"out={out}: holds a README.md that is not TRL's model card (a stage would replace it); "
                              "move it away or pick another out=")
    for name in STAGE_DIRS:
        if (out / name).is_symlink():
            raise ConfigError(f"out={out}: {name} is a symlink (to {os.readlink(out / name)}); the stage writes {name}/ "
                              "itself and would write through it (remove the link)")


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


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite: the stage stops (exit 2) without saving them."""


def _make_guard_class():
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        """Stop the stage when training stops being finite (issue 18, item 6: train.lr=inf gave a final/
        whose every tensor was NaN, with exit 0). Checked: every logged training loss; the trainable
        weights before each checkpoint is written (a NaN update can come between two logged losses) and
        at the end of training, every rank on its own shard, agreed by all-reduce. On a failure it raises
        TrainingDiverged: nothing more is saved, so the checkpoints on disk are the good ones, and the
        stage writes no final/ and no summary.json (the pipeline does not count it as finished)."""

        def __init__(self, out: str | os.PathLike, stage: str = ""):
            self.out = Path(out)
            self.stage = stage

        def _stop(self, state, what: str) -> None:
            from recipes.training import latest_checkpoint

            last = latest_checkpoint(self.out)
            if last:
                after = (f"the last good checkpoint is {last}; no final/ written); lower train.lr or check the data, "
                         f"then rerun (resume=auto goes on from {Path(last).name}, resume=never starts over)")
            else:
                after = ("no checkpoint was written; no final/ written); check the starting model, the data and "
                         "train.lr, then rerun")
            raise TrainingDiverged(f"{self.stage}: {what} at step {state.global_step}: stopped without saving ({after}")

        @staticmethod
        def _weights_finite(args, model) -> bool:
            import torch

            finite = True
            if model is not None:
                with torch.no_grad():
                    for param in model.parameters():
                        if param.requires_grad:
                            tensor = getattr(param, "ds_tensor", param)  # ZeRO-3: this rank's shard
                            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                                finite = False
                                break
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                flag = torch.tensor([0 if finite else 1], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                finite = not flag.item()
            return finite

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if isinstance(loss, (int, float)) and not math.isfinite(loss):
                self._stop(state, f"the training loss is {loss}")
            return control

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and not self._weights_finite(args, model):
                self._stop(state, "the weights are no longer finite")
            return control

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if not self._weights_finite(args, model):
                self._stop(state, "the weights are no longer finite")
            return control

    return NonFiniteGuard


def __getattr__(name):
    # transformers is imported only when a trainer asks for a callback.
    makers = {"PreemptionCallback": _make_callback_class, "NonFiniteGuard": _make_guard_class}
    if name in makers:
        cls = makers[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


# ---- the output-dir lock ----------------------------------------------------------------------

def process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with host and PID, an
    identity that a reused PID does not repeat. None where /proc is not there."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _launch_id() -> str | None:
    """The distributed launch this process is a rank of, when it is one inside a SLURM job step (the
    HF job's `accelerate launch` on each node of one srun step): SLURM job id + step id. None otherwise."""
    from recipes.training import CHILD_ENV

    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if job and step and os.environ.get(CHILD_ENV) == "1" and "RANK" in os.environ:
        return f"{job}.{step}"
    return None


def _my_identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
            "job_id": os.environ.get("SLURM_JOB_ID"), "step_id": os.environ.get("SLURM_STEP_ID"),
            "launch": _launch_id()}


def _token(owner: dict) -> str:
    """The holder's identity: host, PID and start time (never the SLURM job id alone)."""
    return f"pid:{owner.get('host')}:{owner.get('pid')}:{owner.get('start')}"


def _joins(owner: dict, me: dict) -> bool:
    """Whether this process may write a dir whose lock `owner` holds: it is the holder, a child of the
    holder (LOCK_ENV inherited), or a rank of the holder's distributed launch (same SLURM job step)."""
    if not owner:
        return False
    token = _token(owner)
    return (token == _token(me) or token == os.environ.get(LOCK_ENV)
            or (owner.get("launch") is not None and owner.get("launch") == me.get("launch")))


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


class OutputLock:
    """`with OutputLock(cfg.out):` around a stage run. A one-line UserError if another live job or
    process holds the dir.

    The lock is an OS lock, `fcntl.flock(LOCK_EX)` on the open file OUT/LOCK_FILE, held for the whole
    run: the kernel (or the file system's lock manager) decides who wins, so two processes that start
    at once can never both hold it, and a holder that dies (even by kill -9) releases it. The owner
    (SLURM job id, host, PID) is written inside only for messages and for children: a process that
    inherited LOCK_ENV from the holder (an accelerate rank) joins the holder's lock. A release
    deletes the file while still holding it; an acquirer checks that the file it locked is still the
    one at the path (else it retries), so a deleted lock can never be held by two processes.
    See docs/architecture.md for what this relies on on NFS and Lustre.
    """

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out) / LOCK_FILE
        self.created = False
        self._fd: int | None = None

    def _describe(self, owner: dict) -> str:
        job = f"SLURM job {owner['job_id']}" + (f" step {owner['step_id']}" if owner.get("step_id") else "") \
            if owner.get("job_id") else ""
        if owner.get("pid"):
            return f"process {owner.get('pid')} on {owner.get('host')}" + (f" ({job})" if job else "")
        return job or "another process"

    def _read_owner(self, fd: int) -> dict:
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _other_live_job(self, owner: dict) -> bool:
        """A lock whose flock is free but whose owner is another live SLURM job: that job holds it on
        another node whose file system keeps flock node-local (Lustre `localflock`)."""
        job = owner.get("job_id")
        return bool(job) and job != os.environ.get("SLURM_JOB_ID") and slurm_job_state(job) in LIVE_JOB_STATES

    def holder(self) -> str | None:
        """Who holds the lock, when that is another live job or process (None: free or ours)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            owner = self._read_owner(fd)
            if _joins(owner, _my_identity()):
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._describe(self._read_owner(fd))
            except OSError:
                return None
            return self._describe(owner) if self._other_live_job(owner) else None
        finally:
            os.close(fd)  # closing drops our shared lock, if we took it

    def acquire(self) -> "OutputLock":
        me = _my_identity()
        unwritten = 0  # a holder between its flock and writing its identity (another node's rank of our job)
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides (group-shared dirs)
            except OSError as exc:
                raise UserError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read_owner(fd)
                os.close(fd)
                if _joins(owner, me):
                    return self  # the holder's child (an accelerate rank) or a rank of its launch
                if not owner and unwritten < 100:
                    unwritten += 1
                    time.sleep(0.05)
                    continue
                raise UserError(f"{self.path.parent} is being written by {self._describe(owner)} "
                                f"(lock {self.path}; delete it if that is wrong)") from None
            except OSError as exc:
                os.close(fd)
                raise UserError(f"cannot lock {self.path}: {exc.strerror} (the file system must support "
                                "flock; see docs/architecture.md)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its holder deleted on release: try the new one
        owner = self._read_owner(fd)
        if owner and _token(owner) != _token(me) and self._other_live_job(owner):
            os.close(fd)
            raise UserError(f"{self.path.parent} is being written by {self._describe(owner)} "
                            f"(lock {self.path}; delete it if that is wrong)")
        data = json.dumps(me).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        os.environ[LOCK_ENV] = _token(me)
        self.created = True
        return self

    def release(self) -> None:
        if not self.created:
            return
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still holding the lock: nobody can take this file now
            os.close(self._fd)
            self._fd = None
        if os.environ.get(LOCK_ENV) == _token(_my_identity()):
            del os.environ[LOCK_ENV]
        self.created = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
