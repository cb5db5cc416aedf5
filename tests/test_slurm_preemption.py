"""recipes/preemption.py without a scheduler: the USR1 callback on a real Trainer, and the output lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from hs3.io import UserError
from recipes.preemption import (LOCK_ENV, LOCK_FILE, PREEMPTED_EXIT_CODE, PREEMPTED_MARKER_FILE,
                                PREEMPT_REQUEST_FILE, OutputLock)

TRAIN_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from recipes.preemption import PreemptionCallback, install_signal_handler

    model_dir, out, how = sys.argv[1], sys.argv[2], sys.argv[3]
    install_signal_handler()

    class Preempt(TrainerCallback):  # the "scheduler": preempt during step 3
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                if how == "signal":
                    os.kill(os.getpid(), signal.SIGUSR1)
                else:
                    open(os.path.join(out, "PREEMPT_REQUEST"), "w").close()

    rows = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(40)]
    args = TrainingArguments(output_dir=out, max_steps=10, per_device_train_batch_size=2, save_strategy="no",
                             report_to=[], use_cpu=True, logging_steps=1)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=rows,
                      callbacks=[Preempt(), PreemptionCallback(out)])
    trainer.train()
    print("finished all steps")
""")


@pytest.mark.parametrize("how", ["signal", "request_file"])
def test_preemption_checkpoints_at_the_current_step_and_exits_75(tmp_path, tiny_model_dir, how):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(tiny_model_dir), str(out), how],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-2000:]
    assert "finished all steps" not in proc.stdout
    # save_strategy="no": the only checkpoint is the one the preemption asked for, at step 3.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert json.loads((out / PREEMPTED_MARKER_FILE).read_text()) == {"step": 3}
    assert not (out / PREEMPT_REQUEST_FILE).exists()


@pytest.fixture
def clean_lock_env(monkeypatch):
    monkeypatch.delenv(LOCK_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_lock_refuses_a_second_live_process_and_takes_over_a_dead_one(tmp_path, clean_lock_env):
    # the sleeper holds the lock (flock on OUT/.lock) and is then killed by -9: no release runs
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys, time; from recipes.preemption import OutputLock; "
                                "OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
                               stdout=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items() if k != LOCK_ENV})
    try:
        assert sleeper.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"process {sleeper.pid} on"):
            OutputLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputLock(tmp_path):  # the holder is dead now: stale, taken over
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_is_shared_with_children_and_own_requeued_job(tmp_path, clean_lock_env, monkeypatch):
    with OutputLock(tmp_path):
        # a child process (e.g. an accelerate rank) inherits the token and may write the dir
        child = subprocess.run([sys.executable, "-c", f"from recipes.preemption import OutputLock; OutputLock({str(tmp_path)!r}).acquire()"],
                               capture_output=True, text=True, env=os.environ.copy())
        assert child.returncode == 0, child.stderr
        # an unrelated process does not
        monkeypatch.delenv(LOCK_ENV)
        stranger = subprocess.run([sys.executable, "-c", f"from recipes.preemption import OutputLock; OutputLock({str(tmp_path)!r}).acquire()"],
                                  capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != LOCK_ENV})
        assert stranger.returncode != 0 and "is being written by process" in stranger.stderr
    # a requeued job finds the lock its own job id wrote before the requeue
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK_FILE).write_text(json.dumps({"job_id": "4242", "host": "elsewhere", "pid": 1}))
    with OutputLock(tmp_path):
        pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_a_job_unknown_to_slurm_is_stale(tmp_path, clean_lock_env):
    # No scheduler knows job 999999 (scontrol missing or job gone): the lock is stale.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"job_id": "999999", "host": "n1", "pid": 1}))
    with OutputLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_signal_handler_sets_the_flag(clean_lock_env):
    from recipes import preemption

    preemption.install_signal_handler()
    assert not preemption.preemption_requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert preemption.preemption_requested()
    preemption._requested = False


def test_a_rank_of_the_same_job_waits_for_the_holder_to_write_its_identity(tmp_path, monkeypatch):
    """Multi-node HF jobs: each node's accelerate rank takes OUT/.lock. A rank that meets the flock between
    the holder's flock and its identity write (an empty lock file) must wait for the identity and then
    join the lock of its own launch (job step), not fail as if another process wrote the dir (seen on the 2-node test
    SLURM: tests/test_slurm_exec.py::test_hf_sft_script_trains_one_deepspeed_group_across_two_nodes)."""
    out = tmp_path / "sft"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, json, os, time
        fd = os.open({str(out / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(0.5)  # the window between flock and the identity write, widened
        os.pwrite(fd, json.dumps({{"job_id": "77", "step_id": "0", "launch": "77.0", "host": "n1", "pid": os.getpid()}}).encode(), 0)
        time.sleep(5)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for key, value in {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "HS3_UNDER_ACCELERATE": "1", "RANK": "1"}.items():
            monkeypatch.setenv(key, value)  # a rank of the same accelerate launch, in the same job step
        lock = OutputLock(out).acquire()  # joins step 77.0's lock (before the fix: UserError at once)
        assert not lock.created
    finally:
        holder.kill()
        holder.wait()
