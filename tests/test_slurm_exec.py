"""Execution tests: the scripts `executor=slurm` renders, run by real bash on a real 2-node SLURM
(tests/slurm_cluster.sh: nodes n1 and n2, each in its own network namespace), with real Ray and a real
torch.distributed group across the nodes. Every srun the batch script runs goes through a recording
wrapper (PATH-prepended `srun`) that logs the argv srun receives, then runs the real srun (without the
pyxis --container-* flags: no pyxis here).

Only the upstream entry points cannot run here (NeMo-RL's examples/run_*.py need GPUs and NeMo-RL's
container): at those paths (megatron.nemo_rl_dir=tests/probes/nemo_rl) a PROBE records what it received.
The whole Megatron chain, submitted and resubmitted as `./launch.sh pipeline` does: tests/test_megatron_chain_slurm.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from recipes.config import REPO_ROOT, compose
from launcher.slurm import render_script, write_job
from tests.conftest import write_edit_data
from tests.test_slurm_jobs import wait_for
from tests.upstream import source

pytestmark = pytest.mark.slurm

PROBES = REPO_ROOT / "tests" / "probes"
ON_SLURM = ["executor=slurm", "cluster=local", "cluster.time=10", "model=tiny"]
RECORDER = """#!/bin/bash
# Records the argv srun receives (one JSON list per line), then runs the real srun without the pyxis flags.
# (one write() of the whole line to an O_APPEND descriptor: the head's and the worker's srun start together)
python3 -c 'import json, os, sys; fd = os.open(os.environ["SRUN_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644); os.write(fd, (json.dumps(sys.argv[1:]) + "\\n").encode())' "$@"
args=()
for a in "$@"; do
  case "$a" in --container-*|--no-container-mount-home) ;; *) args+=("$a") ;; esac
done
exec {real} "${{args[@]}}"
"""


@pytest.fixture
def srun_recorder(tmp_path):
    """(env for sbatch, path of the record): PATH starts with a recording `srun`."""
    real = shutil.which("srun")
    assert real, "srun not found"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(RECORDER.format(real=shlex.quote(real)))
    (bin_dir / "srun").chmod(0o755)
    record = tmp_path / "srun-argv.jsonl"
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_RECORD": str(record)}, record


def submit(script: Path, env: dict, after: str | None = None) -> str:
    dependency = [f"--dependency=afterok:{after}"] if after else []
    proc = subprocess.run(["sbatch", "--parsable", *dependency, str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def recorded_sruns(record: Path) -> list[list[str]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture(scope="session")
def nemo_rl_src(tmp_path_factory) -> Path:
    """A directory holding only NeMo-RL's `nemo_rl` package at the pin (tests/upstream.toml): our wrapper and
    the probes import its pure-Python parts; the pinned tree's own `tests` package must not shadow ours."""
    root = tmp_path_factory.mktemp("nemo_rl_pinned")
    (root / "nemo_rl").symlink_to(source("nemo_rl", "git") / "nemo_rl", target_is_directory=True)
    return root


def nemo_rl_cfg(stage: str, run_dir: Path, *extra: str):
    return compose(stage, [
        "engine=megatron", f"run_dir={run_dir}", *ON_SLURM, "cluster.signal_seconds=60", "megatron.setup_minutes=1",
        "parallel.nodes=2", "parallel.gpus_per_node=1", "cluster.gpus_per_node=1", "cluster.request_gpus=false",
        "tp=1", "pp=1", "sp=false", "gbs=2", "mbs=1", "megatron.reward_model_nodes=1",
        f"megatron.nemo_rl_dir={PROBES / 'nemo_rl'}", "megatron.nemo_rl_container=", "megatron.container=",
        # a container image, so that the --container-mounts argument is rendered (the recorder drops it)
        "cluster.container_image=example/nemo-rl:probe", f"cluster.setup=[source {REPO_ROOT}/.venv/bin/activate]",
        *(["parallel.fsdp=true"] if stage == "rm" else []), *extra])


# A run dir with a space and a command substitution: quoted, it is one word and never executed.
HOSTILE = "run dir $(touch PWNED) `touch PWNED2`"


@pytest.mark.parametrize("stage", ["rl", "rm", "dpo"])
def test_nemo_rl_stage_runs_ray_across_two_nodes(stage, slurm, nemo_rl_src, srun_recorder, tmp_path, tiny_model_dir):
    """The rendered rm/rl/dpo script on 2 nodes: srun gets the expanded head node (-w/--exclude), never
    `$MASTER_ADDR`; Ray's head binds the first node's IP (ray.sub:271-313, 567) and a worker on the other
    node joins; each Ray node has its node's CPUTot (ray.sub:64-93, 860, 876), not cpus_per_task; the
    probe at NeMo-RL's entry point sees both nodes and runs a task on each."""
    run_dir = tmp_path / (HOSTILE if stage == "rl" else "run")
    write_edit_data(run_dir / "data", n_train=8, n_validation=2)
    # init: the model the job's wrapper counts tokens with (the length rules and rm's selection slice)
    cfg = nemo_rl_cfg(stage, run_dir, "cluster.cpus_per_task=1", f"init={tiny_model_dir}")
    files = write_job(cfg)
    env, record = srun_recorder
    env.update({"PYTHONPATH": str(nemo_rl_src), "PROBE_ENTRY_RECORD": str(tmp_path / "probe.json"), "PROBE_EXPECT_NODES": "2",
                "HF_TOKEN": "hf_probe_secret_123"})
    job = submit(files["script"], env)
    info = wait_for([job], timeout=240)[job]
    log = Path(str(files["log"]).replace("%j", job)).read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert not list(tmp_path.rglob("PWNED*")) and not (REPO_ROOT / "PWNED").exists()  # nothing executed

    nodes = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True,
                           check=True).stdout.split()
    assert nodes == ["n1", "n2"]
    sruns = [argv[:argv.index("bash")] for argv in recorded_sruns(record)]  # srun's options (the task expands its own)
    assert not [a for argv in sruns for a in argv if "$" in a and HOSTILE not in a], sruns  # every variable expanded
    [head] = [argv for argv in sruns if "-w" in argv]
    [worker] = [argv for argv in sruns if argv is not head]
    assert "--exclude=n1" in worker and "--cpus-per-task=2" in worker  # CPUTot of a test node: 2
    assert head[head.index("-w") + 1] == "n1" and "--cpus-per-task=2" in head
    mounts = next(a for a in head if a.startswith("--container-mounts="))
    assert f"{run_dir}:{run_dir}" in mounts.split("=", 1)[1].split(",")  # one argument, space and all

    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["errors"] == [] and probe["host"] == "n1"
    ips = subprocess.run(["awk", "{print $1, $2}", str(Path(slurm).parent / "hosts-n1")], capture_output=True,
                         text=True).stdout.split("\n")
    addr = {name: ip for ip, name in (line.split() for line in ips if line)}
    assert probe["env"]["MASTER_ADDR"] == "n1" and probe["env"]["RAY_HEAD_IP"] == addr["n1"]
    assert sorted(n["address"] for n in probe["ray_nodes"]) == [addr["n1"], addr["n2"]]
    assert all(n["resources"]["CPU"] == 2 and n["resources"]["GPU"] == 1 for n in probe["ray_nodes"])
    assert sorted(probe["task_hosts"]) == ["n1", "n2"]  # a task really ran on the worker node
    assert probe["argv"][1:] == ["--config", str(run_dir / stage / f"nemo_rl_{stage}.yaml")]
    assert "policy" in probe["config"]["keys"]
    assert probe["hf_token_sha256"] == hashlib.sha256(b"hf_probe_secret_123").hexdigest()
    for path in run_dir.rglob("*"):  # the token went through the environment, into no file
        if path.is_file():
            assert b"hf_probe_secret_123" not in path.read_bytes(), path


def test_megatron_layout_forms_one_gloo_group_across_two_nodes(slurm, srun_recorder, tmp_path):
    """The Megatron layout (one task per GPU) on 2 nodes x 2 tasks: RANK/WORLD_SIZE/LOCAL_RANK from SLURM,
    MASTER_ADDR the first node, and the 4 ranks form one torch.distributed (gloo) group over the network."""
    run_dir = tmp_path / "run dir"
    cfg = compose("sft", ["engine=megatron", "megatron.container=", f"run_dir={run_dir}", *ON_SLURM, "nodes=2",
                          "parallel.nodes=2", "cluster.gpus_per_node=2", "parallel.gpus_per_node=2",
                          "cluster.request_gpus=false", "gbs=8", "mbs=1"])
    probe = textwrap.dedent("""
        import json, os, socket, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        total = torch.tensor([dist.get_rank() + 1]); dist.all_reduce(total)
        hosts = [None] * dist.get_world_size(); dist.all_gather_object(hosts, socket.gethostname())
        keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"]
        print("PROBE " + json.dumps({**{k: os.environ.get(k) for k in keys}, "sum": int(total), "hosts": hosts,
                                     "host": socket.gethostname()}), flush=True)
        dist.destroy_process_group()
    """)
    (run_dir / "slurm").mkdir(parents=True)
    script = run_dir / "slurm" / "probe.sbatch"
    script.write_text(render_script(cfg, command=f"python -c {shlex.quote(probe)}"))
    env, record = srun_recorder
    job = submit(script, env)
    info = wait_for([job], timeout=180)[job]
    log = (run_dir / "slurm" / f"sft-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    probes = [json.loads(line.split("PROBE ", 1)[1]) for line in log.splitlines() if line.startswith("PROBE ")]
    assert sorted(int(p["RANK"]) for p in probes) == [0, 1, 2, 3]
    assert {p["host"] for p in probes} == {"n1", "n2"} and {p["MASTER_ADDR"] for p in probes} == {"n1"}
    assert all(p["WORLD_SIZE"] == "4" and p["sum"] == 10 for p in probes)  # 1+2+3+4 over both nodes
    assert sorted(p["hosts"][0] for p in probes) == ["n1"] * 4
    [srun] = recorded_sruns(record)
    assert srun[:4] == ["--nodes=2", "--ntasks-per-node=2", "--kill-on-bad-exit=1", "bash"]


def test_hf_token_reaches_the_task_from_the_login_token_file(slurm, tmp_path):
    """Containers run with --no-container-mount-home: the batch script reads the login's token file on the
    host into HF_TOKEN (environment only); the rendered files never hold the value."""
    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text("hf_file_secret_456")
    cfg = compose("data", [f"run_dir={tmp_path}", *ON_SLURM])
    probe = "python -c 'import hashlib, os; print(\"PROBE\", hashlib.sha256(os.environ[\"HF_TOKEN\"].encode()).hexdigest())'"
    (tmp_path / "slurm").mkdir()
    script = tmp_path / "slurm" / "probe.sbatch"
    script.write_text(render_script(cfg, command=probe))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HOME", "HF_TOKEN_PATH")}
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env={**env, "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    info = wait_for([job], timeout=120)[job]
    log = (tmp_path / "slurm" / f"data-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-2000:]
    assert f"PROBE {hashlib.sha256(b'hf_file_secret_456').hexdigest()}" in log
    assert "hf_file_secret_456" not in script.read_text() + log


MEGATRON_PROBE = REPO_ROOT / "tests" / "megatron_probe"  # PROBE of megatron.bridge (its docstring)


def test_megatron_sft_and_convert_scripts_run_on_two_nodes(slurm, srun_recorder, tiny_model_dir, tmp_path):
    """engine=megatron's own scripts, rendered and submitted as `./launch.sh` does (write_job), in a run dir with a
    space: convert (hf_to_megatron, one task) runs our convert job, which hands Megatron-Bridge's conversion
    worker (a PROBE at megatron.megatron_bridge_dir running Megatron-Bridge's own destination check) a fresh
    staging dir and renames it onto import's destination; sft runs our bridge_sft wrapper as one task per GPU on
    2 nodes (megatron.bridge is a PROBE: tests/megatron_probe) and every rank reaches finetune; the export
    (megatron_to_hf) runs after sft (afterok) and leaves an HF model in sft/final."""
    run_dir = tmp_path / "run dir"
    write_edit_data(run_dir / "data", n_train=8, n_validation=2)
    common = ["engine=megatron", f"run_dir={run_dir}", *ON_SLURM, "megatron.container=", "cluster.signal_seconds=60",
              f"megatron.megatron_bridge_dir={PROBES / 'megatron_bridge'}", f"megatron.hf_model_id={tiny_model_dir}"]
    convert = write_job(compose("convert", [*common, f"init={tiny_model_dir}"]))
    sft = write_job(compose("sft", [*common, "parallel.nodes=2", "parallel.gpus_per_node=1", "cluster.gpus_per_node=1",
                                    "cluster.request_gpus=false", "tp=1", "pp=1", "sp=false", "gbs=2", "mbs=1"]))
    env, record = srun_recorder
    env.update({"PROBE_RECORD": str(tmp_path / "conversions.jsonl"), "PROBE_LOG": str(tmp_path / "sft.jsonl"),
                "PROBE_MB_SCRIPTS": str(source("megatron_bridge", "git") / "scripts" / "conversion"),
                "PYTHONPATH": str(MEGATRON_PROBE), "HF_HUB_OFFLINE": "1"})
    # the export after sft (afterok), as the pipeline chains it: Megatron checkpoints -> sft/final (HF)
    export = write_job(compose("convert", [*common, "name=sft_export", f"out={run_dir}/sft_export",
                                           "megatron.convert_direction=megatron_to_hf", f"init={run_dir}/sft/checkpoints",
                                           f"megatron.convert_dest={run_dir}/sft/final"]))
    jobs = {"convert": submit(convert["script"], env), "sft": submit(sft["script"], env)}
    jobs["sft_export"] = submit(export["script"], env, after=jobs["sft"])
    infos = wait_for(jobs.values(), timeout=300)
    logs = {s: Path(str(f["log"]).replace("%j", jobs[s])).read_text()
            for s, f in (("convert", convert), ("sft", sft), ("sft_export", export))}
    assert {s: infos[j]["JobState"] for s, j in jobs.items()} == dict.fromkeys(jobs, "COMPLETED"), logs
    assert infos[jobs["sft"]]["EndTime"] <= infos[jobs["sft_export"]]["StartTime"]
    calls = {c["argv"][0]: c["argv"] for c in map(json.loads, (tmp_path / "conversions.jsonl").read_text().splitlines())}
    assert calls["import"][calls["import"].index("--megatron-path") + 1] == str(run_dir / "convert" / ".converted.converting")
    assert calls["export"][calls["export"].index("--hf-path") + 1] == str(run_dir / "sft" / ".final.converting")
    assert calls["export"][calls["export"].index("--megatron-path") + 1] == str(run_dir / "sft" / "checkpoints")
    assert (run_dir / "convert" / "converted" / "PROBE_RECORD.json").is_file()
    assert json.loads((run_dir / "sft" / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for name in ("convert", "sft_export"):
        assert json.loads((run_dir / name / "summary.json").read_text())["metric"] == "converted"

    events = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    finetunes = [e for e in events if e["event"] == "finetune"]
    assert sorted(e["rank"] for e in finetunes) == ["0", "1"]  # SLURM_PROCID of a task on each node
    sruns = {tuple(a for a in argv[:argv.index("bash")]) for argv in recorded_sruns(record)}
    assert ("--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1") in sruns
    assert ("--nodes=1", "--ntasks=1") in sruns


@pytest.mark.slow
def test_hf_sft_script_trains_one_deepspeed_group_across_two_nodes(slurm, srun_recorder, tmp_path):
    """engine=hf on 2 nodes: one task per node runs `accelerate launch` with its node's rank and the first
    node as rendezvous; torchrun's static rendezvous (accelerate's standard multi-node launcher) only
    proceeds once both nodes joined, and the sft stage trains and writes its final model.
    The accelerate config is conf/accelerate/zero3_cpu.yaml with zero3.yaml's
    `deepspeed_multinode_launcher: standard` (accelerate's default, pdsh, needs ssh between nodes)."""
    run_dir = tmp_path / "run dir"
    write_edit_data(run_dir / "data", n_train=8, n_validation=2)
    accelerate_config = tmp_path / "zero3_cpu_multinode.yaml"
    text = (REPO_ROOT / "conf" / "accelerate" / "zero3_cpu.yaml").read_text()
    accelerate_config.write_text(text.replace("  offload_param_device: none\n",
                                              "  offload_param_device: none\n  deepspeed_multinode_launcher: standard\n"))
    cfg = compose("sft", [f"run_dir={run_dir}", *ON_SLURM, "nodes=2", "hf.num_processes=1", "train.max_steps=2", "gbs=2",
                          "mbs=1", f"hf.accelerate_config={accelerate_config}"])
    files = write_job(cfg)
    env, record = srun_recorder
    # c10d logs each TCPStore client that connects to the rendezvous
    env.update({"TORCH_CPP_LOG_LEVEL": "INFO", "TORCH_DISTRIBUTED_DEBUG": "INFO"})
    job = submit(files["script"], env)
    info = wait_for([job], timeout=300)[job]
    log = Path(str(files["log"]).replace("%j", job)).read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    [srun] = recorded_sruns(record)
    assert srun[:srun.index("bash")] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert log.count("TCP client connected to host n1:") >= 2  # clients on both nodes reached n1's store
    assert json.loads((run_dir / "sft" / "summary.json").read_text())["steps"] == 2
    assert (run_dir / "sft" / "final" / "config.json").is_file()
