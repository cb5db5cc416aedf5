"""sft on Megatron-Bridge: our wrapper (recipes/megatron/bridge_sft.py) against Megatron-Bridge's own code from
the pinned wheels (tests/upstream.toml) where it runs on CPU: read_train_state and its lru_cache, TrainState,
the tracker's file name (training/utils/checkpoint_utils.py; loaded by tests/megatron_probe/mb_upstream.py,
which says what of their imports is left out), and megatron-core's LoggerConfig / CheckpointConfig. Where a
GPU is needed (the recipe, finetune) the wrapper meets the PROBE in tests/megatron_probe (it records what it
receives and computes nothing of Megatron-Bridge's). Issue 16, findings 5 and 9."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recipes.config import REPO_ROOT, compose
from recipes.megatron import bridge_sft
from recipes.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER_FILE
from tests.conftest import write_edit_data
from tests.megatron_probe.mb_upstream import CHECKPOINT_UTILS, load_checkpoint_utils
from tests.upstream import source

PROBE_PATH = REPO_ROOT / "tests" / "megatron_probe"


@pytest.fixture
def wheels() -> tuple[Path, Path]:
    return source("megatron_bridge", "wheel"), source("megatron_core", "wheel")


@pytest.fixture
def checkpoint_utils(wheels, monkeypatch):
    """Megatron-Bridge's checkpoint_utils module, where bridge_sft imports it from."""
    module = load_checkpoint_utils(*wheels)
    monkeypatch.setitem(sys.modules, CHECKPOINT_UTILS, module)
    return module


def save_tracker(utils, save_dir: Path, step: int) -> Path:
    """The top-level tracker as Megatron-Bridge's save_checkpoint writes it on rank 0: the TrainState's
    state_dict, torch.save'd to SAVE/latest_train_state.pt (checkpointing.py:1430-1450)."""
    import torch

    save_dir.mkdir(parents=True, exist_ok=True)
    tracker = utils.get_checkpoint_train_state_filename(str(save_dir), prefix=utils.TRACKER_PREFIX)
    torch.save(utils.TrainState(step=step).state_dict(), tracker)
    return Path(tracker)


# ---- finding 5: a resumed launch that finished is finished ------------------------------------------

def test_a_resumed_launch_reads_the_iteration_it_saved_last(checkpoint_utils, wheels, tmp_path):
    """Megatron-Bridge caches read_train_state by file name (@lru_cache, checkpoint_utils.py:443). A launch
    that resumed read the tracker at step 5 (load_checkpoint, checkpointing.py:2863-2866); training then
    saved step 10 into the same file. Our finish must see 10 (the run is complete: exit 0, summary.json),
    not the cached 5 (exit 75: the job would requeue and load 70B weights once more)."""
    source_text = (wheels[0] / "megatron" / "bridge" / "training" / "utils" / "checkpoint_utils.py").read_text()
    assert "@lru_cache()\ndef read_train_state(train_state_filename: str) -> TrainState:" in source_text
    state_text = (wheels[0] / "megatron" / "bridge" / "training" / "state.py").read_text()
    assert "read_train_state.cache_clear()" in state_text  # Megatron-Bridge clears it before a restart

    save = tmp_path / "sft" / "checkpoints"
    tracker = save_tracker(checkpoint_utils, save, 5)
    assert checkpoint_utils.read_train_state(str(tracker)).step == 5  # this launch resumed from step 5
    save_tracker(checkpoint_utils, save, 10)  # ... and saved its last iteration
    assert checkpoint_utils.read_train_state(str(tracker)).step == 5  # what the cache still says

    assert bridge_sft.saved_iteration(str(save)) == 10
    document = {"out": str(tmp_path / "sft")}
    # finetune ended in sys.exit(0) (an exit signal came after the last save): finished, not preempted
    assert bridge_sft.finish(document, 10, time.monotonic(), rank=0, stopped=True) == 0
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["value"] == 10
    save_tracker(checkpoint_utils, save, 7)  # a launch that really stopped short of the plan
    assert bridge_sft.finish(document, 10, time.monotonic(), rank=0, stopped=True) == PREEMPTED_EXIT_CODE
    assert json.loads((tmp_path / "sft" / PREEMPTED_MARKER_FILE).read_text()) == {"step": 7}


# ---- the in-container half against the probe --------------------------------------------------------

def sft_job(run_dir: Path, log: Path, rank: int, launch: str, wheels, **env) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": f"{PROBE_PATH}{os.pathsep}{REPO_ROOT}", "PROBE_LOG": str(log),
                   "PROBE_MB_WHEEL": str(wheels[0]), "PROBE_MCORE_WHEEL": str(wheels[1]),
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "SLURM_JOB_ID": launch, "SLURM_RESTART_COUNT": "0", **env}
    return subprocess.Popen([sys.executable, "-m", "recipes.megatron.bridge_sft", "--config",
                             str(run_dir / "sft" / bridge_sft.CONFIG_NAME)], cwd=REPO_ROOT, env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sft_prepares_the_data_once_before_any_rank_trains(wheels, tmp_path):
    """Rank 0 writes the dataset and runs Megatron-Bridge's packing step (GPTSFTDatasetBuilder.prepare_data)
    before any collective; rank 1, started first, waits for its marker outside torch.distributed; both then
    reach finetune with the same dataset and overrides. finetune returned: the loop ran to its end (summary)."""
    write_edit_data(tmp_path / "data", n_train=7, n_validation=2)
    cfg = compose("sft", ["engine=megatron", f"run_dir={tmp_path}", "gbs=2", "train.packing=true", "parallel.nodes=1",
                          "tp=8", "pp=1"])
    bridge_sft.render(cfg)
    log = tmp_path / "probe.jsonl"
    waiting = sft_job(tmp_path, log, 1, "41", wheels)
    time.sleep(1)
    first = sft_job(tmp_path, log, 0, "41", wheels)
    outs = [first.communicate(timeout=300)]
    if first.returncode:  # rank 1 would wait for rank 0's marker for ever (srun --kill-on-bad-exit ends it)
        waiting.kill()
    outs.append(waiting.communicate(timeout=300))
    assert [p.returncode for p in (first, waiting)] == [0, 0], outs
    events = [json.loads(line) for line in log.read_text().splitlines()]
    prepares = [e for e in events if e["event"] == "prepare_data"]
    finetunes = [e for e in events if e["event"] == "finetune"]
    assert [e["rank"] for e in prepares] == ["0"] and sorted(e["rank"] for e in finetunes) == ["0", "1"]
    assert events.index(prepares[0]) < min(events.index(e) for e in finetunes)
    dataset = finetunes[0]["dataset"]
    assert dataset == finetunes[1]["dataset"] == prepares[0]["dataset"] | {"dataloader_type": "batch"}
    assert dataset["enable_offline_packing"] and dataset["preprocessing"] == {"loss_mode": "last_turn"}
    assert len((tmp_path / "sft" / "dataset" / "training.jsonl").read_text().splitlines()) == 7
    assert finetunes[0]["overrides"] == bridge_sft.bridge_config(cfg, 7)["overrides"]
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["stage"] == "sft"


def test_sft_stopped_by_the_exit_signal_short_of_the_plan_exits_75(wheels, tmp_path):
    """Megatron-Bridge checkpoints on SIGTERM, then sys.exit(0) (train.py:794-805): the stage exits
    PREEMPTED_EXIT_CODE so the batch script requeues it and its dependents (afterok) wait. The checkpoint it
    saved (iteration 1 of train.max_steps=2) is a tracker written with Megatron-Bridge's own TrainState."""
    train_py = (wheels[0] / "megatron" / "bridge" / "training" / "train.py").read_text().splitlines()
    assert train_py[804].strip() == "sys.exit(exit_code)" and train_py[794].strip() == "if should_exit:"
    write_edit_data(tmp_path / "data", n_train=4, n_validation=1)
    bridge_sft.render(compose("sft", ["engine=megatron", f"run_dir={tmp_path}", "gbs=2", "train.max_steps=2",
                                      "parallel.nodes=1", "tp=8", "pp=1"]))
    save_tracker(load_checkpoint_utils(*wheels), tmp_path / "sft" / "checkpoints", 1)
    job = sft_job(tmp_path, tmp_path / "probe.jsonl", 0, "42", wheels, PROBE_EXIT="signal")
    out, err = job.communicate(timeout=300)
    assert job.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "stopped at iteration 1 of 2 with a checkpoint" in out
    assert json.loads((tmp_path / "sft" / PREEMPTED_MARKER_FILE).read_text()) == {"step": 1}
    assert not (tmp_path / "sft" / "summary.json").exists()


# ---- finding 9: checkpoints kept, loggers -----------------------------------------------------------

def megatron_core_training_config(mcore_wheel: Path):
    """megatron-core's training_config.py (stdlib-only dataclasses), from the pinned wheel."""
    path = mcore_wheel / "megatron" / "training" / "config" / "training_config.py"
    spec = importlib.util.spec_from_file_location("mcore_training_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def overrides(cfg) -> dict[str, str]:
    return dict(o.split("=", 1) for o in bridge_sft.bridge_config(cfg, 100)["overrides"])


def test_checkpoints_kept_and_loggers_reach_megatron_bridge(wheels, monkeypatch):
    """train.save_total_limit -> checkpoint.most_recent_k (megatron-core's default -1 keeps every ~1.3 TB
    checkpoint); train.report_to -> the TensorBoard dir and Megatron-Bridge's W&B writer, which starts when
    logger.wandb_project is set (state.py:197-221) and reads its key from WANDB_API_KEY (never a file here)."""
    config = megatron_core_training_config(wheels[1])
    logger_fields = {f.name: f for f in dataclasses.fields(config.LoggerConfig)}
    checkpoint_fields = {f.name: f for f in dataclasses.fields(config.CheckpointConfig)}
    assert checkpoint_fields["most_recent_k"].default == -1  # keep all
    state = (wheels[0] / "megatron" / "bridge" / "training" / "state.py").read_text()
    assert "if self.cfg.logger.wandb_project and get_rank_safe() == (get_world_size_safe() - 1):" in state
    assert 'if "WANDB_API_KEY" in os.environ:' in state
    checkpointing = (wheels[0] / "megatron" / "bridge" / "training" / "checkpointing.py").read_text()
    assert "cleanup_old_non_persistent_checkpoint(save_dir, leave_ckpt_num=ckpt_cfg.most_recent_k" in checkpointing

    base = ["engine=megatron", "model=llama33_70b"]
    kept = overrides(compose("sft", [*base, "train.save_total_limit=2"]))
    assert kept["checkpoint.most_recent_k"] == "2"
    for key in kept:  # every logger.* / checkpoint.* key we set is one megatron-core's configs have
        section, _, name = key.partition(".")
        if section in ("logger", "checkpoint") and name != "pretrained_checkpoint":  # pretrained_: Bridge's own
            assert name in (logger_fields if section == "logger" else checkpoint_fields), key
    assert kept["logger.tensorboard_dir"].endswith("/sft/tb_logs") and kept["logger.wandb_project"] == "null"

    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-1234")
    cfg = compose("sft", [*base, "train.report_to=wandb", "run_dir=runs/r7", "train.wandb_project=my-project"])
    logged = overrides(cfg)
    assert logged["logger.wandb_project"] == "my-project" and logged["logger.wandb_exp_name"] == "r7-sft"
    assert logged["logger.wandb_save_dir"].endswith("/runs/r7/sft/wandb") and logged["logger.tensorboard_dir"] == "null"
    assert "wandb-secret-1234" not in yaml.safe_dump(bridge_sft.bridge_config(cfg, 100))
    none = overrides(compose("sft", [*base, "train.report_to=none"]))
    assert none["logger.tensorboard_dir"] == "null" and none["logger.wandb_project"] == "null"


def test_wandb_key_comes_from_the_users_login_through_the_environment(tmp_path, monkeypatch):
    """`wandb login` keeps the key in ~/.netrc (machine api.wandb.ai). Submitting accepts that login without
    WANDB_API_KEY; the batch script reads it on the host into the environment the tasks inherit (the
    containers do not mount $HOME), and no rendered file holds it."""
    from launcher.slurm import render_script

    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login a password b\nmachine api.wandb.ai\n  login me\n  password wandb-key-777\n")
    netrc.chmod(0o600)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    cfg = compose("sft", ["engine=megatron", "executor=slurm", "cluster=example", "train.report_to=wandb",
                          f"run_dir={tmp_path / 'run'}", "megatron.container="])  # no ConfigError: the login counts
    script = render_script(cfg)
    assert "wandb-key-777" not in script + yaml.safe_dump(bridge_sft.bridge_config(cfg, 10))
    section = script[script.index("# W&B (train.report_to=wandb)"):script.index("# Preemption / time limit")]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "NETRC": str(netrc)}
    out = subprocess.run(["bash", "-c", section + 'python3 -c "import os; print(os.environ[\'WANDB_API_KEY\'])"'],
                         env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "wandb-key-777", out.stderr
    netrc.write_text("machine example.com login a password b\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    from recipes.config import ConfigError

    with pytest.raises(ConfigError, match="needs WANDB_API_KEY in the environment or a `wandb login`"):
        compose("sft", ["engine=megatron", "train.report_to=wandb"])
    assert "# W&B" not in render_script(compose("sft", ["engine=megatron", "executor=slurm", "cluster=example",
                                                         f"run_dir={tmp_path / 'run'}", "megatron.container="]))
