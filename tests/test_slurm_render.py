"""The rendered sbatch scripts (no scheduler needed): `./launch.sh ... executor=slurm --dry-run`."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from recipes.config import REPO_ROOT, compose
from recipes.megatron import job_nodes
from launcher.slurm import render_script
from tests.conftest import run_cli


def dry_run(*args: str) -> str:
    proc = run_cli("-m", "launcher", *args, "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def sbatch_options(script: str) -> dict[str, str]:
    """#SBATCH --key=value lines; sbatch drops the double quotes around a value (a path with a space)."""
    return {k: v[1:-1] if v[:1] == v[-1:] == '"' and len(v) > 1 else v
            for k, v in re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, re.M)}


def srun_lines(script: str) -> list[list[str]]:
    """Each srun command of the script, as the shell would split it."""
    text = script.replace("\\\n", " ")
    return [shlex.split(line.rstrip(" &")) for line in text.splitlines() if line.startswith("srun ")]


def assert_bash_syntax(script: str, tmp_path) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_megatron_sft_on_four_8gpu_nodes(tmp_path):
    script = dry_run("sft", "engine=megatron", "executor=slurm", "cluster=example", "nodes=4", "model=llama33_70b",
                     f"run_dir={tmp_path}")
    assert_bash_syntax(script, tmp_path)
    opts = sbatch_options(script)
    assert opts["nodes"] == "4" and opts["ntasks-per-node"] == "8" and opts["gpus-per-node"] == "8"
    assert opts["account"] == "my_account" and opts["partition"] == "batch" and opts["time"] == "04:00:00"
    assert opts["signal"] == "B:USR1@600" and "requeue" in opts and opts["kill-on-invalid-dep"] == "yes"
    assert opts["output"] == f"{tmp_path}/slurm/sft-%j.log" and opts["open-mode"] == "append"
    assert "exclusive" in opts  # extra_sbatch, verbatim
    [srun] = srun_lines(script)
    assert srun[:4] == ["srun", "--nodes=4", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    # the Megatron engine's pinned container, with the repo and the run dir mounted at their own paths
    assert f"--container-image={compose('sft', ['engine=megatron']).megatron.container}" in srun
    assert compose("sft", ["engine=megatron"]).megatron.container.endswith("/megatron-bridge-0.6.2-pytorch26.06.sqsh")
    mounts = next(a for a in srun if a.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert {"/lustre:/lustre", f"{REPO_ROOT}:{REPO_ROOT}", f"{tmp_path}:{tmp_path}"} <= set(mounts)
    # each task: its rank from SLURM, the cluster's setup lines, then the stage
    task = srun[-1]
    assert srun[-3:-1] == ["bash", "-c"]
    assert "export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in task
    assert "export HF_HOME=/lustre/cache/huggingface" in task
    assert task.endswith(f"exec python -m recipes.megatron.bridge_sft --config {tmp_path}/sft/megatron_bridge_sft.yaml")
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "export MASTER_PORT=" in script and "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script
    assert "trap on_usr1 USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_hf_sft_on_two_nodes_uses_accelerate_per_node(tmp_path):
    script = dry_run("sft", "engine=hf", "executor=slurm", "cluster=example", "nodes=2", "model=llama33_70b",
                     f"run_dir={tmp_path}")
    assert_bash_syntax(script, tmp_path)
    opts = sbatch_options(script)
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "1" and opts["gpus-per-node"] == "8"
    [srun] = srun_lines(script)
    assert srun[1:5] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert f"--container-image={compose('sft', ['cluster=example']).cluster.container_image}" in srun  # the cluster's (not Megatron's)
    task = srun[-1]
    launch = shlex.split(task.split("exec ", 1)[1])
    assert launch[:3] == ["python", "-m", "accelerate.commands.launch"]
    flags = dict(zip(launch[3::2], launch[4::2]))
    assert flags["--num_processes"] == "16" and flags["--num_machines"] == "2"
    # $VARIABLES stay unexpanded in the script: each task fills in its own node's values
    assert flags["--machine_rank"] == "$SLURM_NODEID"
    assert flags["--main_process_ip"] == "$MASTER_ADDR" and flags["--main_process_port"] == "$MASTER_PORT"
    assert launch[-3:] == ["-m", "recipes.training", f"{tmp_path}/slurm/sft.yaml"]
    assert "export HS3_UNDER_ACCELERATE=1" in task  # the ranks must not relaunch accelerate themselves


def test_hf_dry_run_checks_the_batch_against_the_gpu_count(tmp_path):
    # 2 nodes x 8 GPUs = 16 processes: global batch 8 with micro batch 2 cannot be split.
    proc = run_cli("-m", "launcher", "sft", "executor=slurm", "cluster=example", "model=tiny", "nodes=2", "gbs=8", "mbs=2",
                   f"run_dir={tmp_path}", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: train.global_batch=8 is not divisible by train.micro_batch=2 x data-parallel size=16 (= 32); "
        "the job runs one process per GPU on 2 node(s) x 8 GPUs (change gbs=, mbs= or nodes=)"]


def test_nemo_rl_stage_starts_a_ray_cluster_and_runs_on_the_head(tmp_path):
    cfg = compose("rl", ["engine=megatron", "executor=slurm", "cluster=example", "nodes=2", "model=llama33_70b",
                         f"run_dir={tmp_path}"])
    nodes, gpus = job_nodes(cfg)  # the Megatron plan's (policy + reward-model nodes)
    assert nodes > 1 and gpus == 8
    script = render_script(cfg, command="python run_rl.py")
    assert_bash_syntax(script, tmp_path)
    assert sbatch_options(script)["nodes"] == str(nodes)
    workers, head = srun_lines(script)
    # (tests/test_slurm_exec.py runs these on a real 2-node SLURM and records what srun receives)
    assert workers[1:6] == [f"--nodes={nodes - 1}", f"--ntasks={nodes - 1}", "--ntasks-per-node=1",
                            "--cpus-per-task=$RAY_CPUS", "--exclude=$MASTER_ADDR"]
    assert 'ray start --address="$RAY_HEAD_IP:6379" --num-cpus="$RAY_CPUS" --num-gpus=8' in workers[-1]
    assert head[1:7] == ["--nodes=1", "--ntasks=1", "--cpus-per-task=$RAY_CPUS", "-w", "$MASTER_ADDR", "--overlap"]
    assert 'ray start --head --node-ip-address="$RAY_HEAD_IP" --port=6379 --num-cpus="$RAY_CPUS" --num-gpus=8' in head[-1]
    opts = sbatch_options(script)
    assert "exclusive" in opts and "cpus-per-task" not in opts  # whole nodes for Ray (ray.sub:3)
    # the stage waits for every node's GPUs, then runs; the workers stop when it has ended
    wait = f"< {nodes * 8}"
    assert wait in head[-1] and head[-1].index(wait) < head[-1].index("python run_rl.py")
    assert 'touch "$RAY_DIR/ENDED"' in head[-1] and 'until [ -f "$RAY_DIR/ENDED" ]' in workers[-1]
    assert "--container-image=nvcr.io/nvidia/nemo-rl:v0.7.0" in head


def test_pipeline_dry_run_chains_the_stages(tmp_path):
    out = dry_run("pipeline", "executor=slurm", "cluster=example", f"run_dir={tmp_path}", "gbs=16", "mbs=2")
    chain = re.findall(r"^# ---- (\w+): sbatch --parsable(?: --dependency=afterok:(\S+))? (\S+)$", out, re.M)
    assert [(stage, after) for stage, after, _ in chain] == [
        ("data", ""), ("sft", "$DATA_JOB"), ("rm", "$SFT_JOB"), ("rl", "$SFT_JOB:$RM_JOB"), ("eval", "$RL_JOB")]
    assert not (tmp_path / "jobs.json").exists()  # a dry run submits and records nothing
    # the data job is one CPU task even on a GPU cluster
    data_script = out.split("# ---- sft:")[0]
    assert "--gpus-per-node" not in data_script and "#SBATCH --nodes=1" in data_script


@pytest.mark.parametrize("setup, expected", [
    ([], "source {venv}/bin/activate"),
    (["module load cuda/12.4", "source /opt/env/bin/activate"], "module load cuda/12.4; source /opt/env/bin/activate"),
])
def test_clusters_without_containers_run_the_setup_lines(tmp_path, setup, expected):
    cfg = compose("sft", ["executor=slurm", "model=tiny", f"run_dir={tmp_path}", f"cluster.setup={setup}".replace("'", "")])
    [srun] = srun_lines(render_script(cfg))
    assert not any(a.startswith("--container") for a in srun)
    assert srun[-1] == f"cd {REPO_ROOT}; " + expected.format(venv=REPO_ROOT / ".venv") + \
        f"; exec python -m launcher.run {tmp_path}/slurm/sft.yaml"


def test_status_of_a_dir_without_stages_is_a_one_line_error(tmp_path):
    proc = run_cli("-m", "launcher", "status", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path}: no stage has started there (no stage dirs, no jobs.json)"


def test_submit_without_sbatch_is_a_one_line_error(tmp_path):
    import sys

    proc = run_cli("-m", "launcher", "sft", "executor=slurm", f"run_dir={tmp_path}",
                   env={"PATH": str(Path(sys.executable).parent)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: sbatch not found: executor=slurm needs a SLURM login node (or use executor=local)"
    assert (tmp_path / "slurm" / "sft.sbatch").is_file()  # rendered; submit it by hand if you like


def test_submit_refuses_an_output_dir_that_another_process_writes(tmp_path):
    import socket
    import sys

    writer = subprocess.Popen([sys.executable, "-c", "import sys, time; from recipes.preemption import OutputLock; "
                               "OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "sft")], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert writer.stdout.readline().strip() == "held"  # it holds the lock (flock on sft/.lock)
        proc = run_cli("-m", "launcher", "sft", "executor=slurm", f"run_dir={tmp_path}")
    finally:
        writer.kill()
        writer.wait()
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path}/sft is being written by process {writer.pid} on {socket.gethostname()} (lock {tmp_path}/sft/.lock)"
    assert not (tmp_path / "slurm").exists()  # refused before anything was rendered


def test_hf_on_one_gpu_nodes_asks_accelerate_for_its_distributed_launcher(tmp_path):
    """accelerate enables multi-GPU by itself only when a node sees more than one GPU
    (accelerate/commands/launch.py, _validate_launch_command; else simple_launcher, which ignores
    --num_machines): 2 nodes x 1 GPU without an accelerate config must pass --multi_gpu."""
    script = dry_run("sft", "executor=slurm", "cluster=example", "model=tiny", "nodes=2", "gpus_per_node=1",
                     "gbs=8", "mbs=2", f"run_dir={tmp_path}")
    [srun] = srun_lines(script)
    launch = shlex.split(srun[-1].split("exec ", 1)[1])
    assert "--multi_gpu" in launch and "--config_file" not in launch
    assert launch[launch.index("--num_machines") + 1] == "2" and launch[launch.index("--num_processes") + 1] == "2"


def test_hf_on_cpu_nodes_needs_an_accelerate_config(tmp_path):
    proc = run_cli("-m", "launcher", "sft", "executor=slurm", "cluster=example", "model=tiny", "nodes=2",
                   "gpus_per_node=0", "hf.num_processes=1", "gbs=8", "mbs=2", f"run_dir={tmp_path}", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: sft on 2 CPU nodes needs hf.accelerate_config (e.g. conf/accelerate/zero3_cpu.yaml): without one "
        "accelerate starts an independent process per node"]


@pytest.mark.parametrize("stage", ["data", "eval"])
def test_our_own_stages_run_in_the_clusters_image_on_the_megatron_engine(tmp_path, stage):
    """data and eval run our code and its dependencies (datasets, sacrebleu, rouge-score...), which the
    pinned Megatron-Bridge / NeMo-RL images do not carry: they use cluster.container_image."""
    script = dry_run(stage, "engine=megatron", "executor=slurm", "cluster=example", f"run_dir={tmp_path}")
    [srun] = srun_lines(script)
    assert f"--container-image={compose(stage, ['cluster=example']).cluster.container_image}" in srun
