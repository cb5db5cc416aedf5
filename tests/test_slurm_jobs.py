"""Real jobs on a real 2-node SLURM (tests/slurm_cluster.sh, started once per test session by the `slurm`
fixture in tests/conftest.py).

Skipped, with the reason, only when SLURM cannot start at all here (e.g. not root and not installed).
Job ids restart at 1 with every fresh cluster: each test uses its own run dir.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from recipes.config import compose
from launcher.slurm import render_script, scontrol_job, submit_pipeline, submit_stage, sbatch, write_job
from launcher.stages import load_preset
from tests.conftest import SAMPLE_DIR, run_cli

pytestmark = pytest.mark.slurm

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Every job of these tests: the test cluster's single partition, no GPUs, the repo's venv.
# model=tiny: without it a SLURM job defaults to the paper's 70B model.
ON_SLURM = ["executor=slurm", "cluster=local", "cluster.time=10", "model=tiny"]


def wait_for(job_ids, timeout: float) -> dict[str, dict]:
    """Poll until every job is in a final state (a requeued job passes through PENDING again)."""
    deadline = time.monotonic() + timeout
    while True:
        infos = {j: scontrol_job(j) for j in job_ids}
        if all(i.get("JobState") in FINAL_STATES for i in infos.values()):
            return infos
        if time.monotonic() > deadline:
            pytest.fail(f"jobs not finished after {timeout}s: " + ", ".join(
                f"{j}={i.get('JobState')}({i.get('Reason')})" for j, i in infos.items()))
        time.sleep(1)


def test_two_task_job_ranks_share_one_master(slurm, tmp_path):
    """The Megatron layout (one task per GPU), rendered by launcher.slurm: 2 tasks on one node whose
    torch.distributed env (RANK, WORLD_SIZE, MASTER_ADDR/PORT from SLURM) really forms a process group."""
    cfg = compose("sft", ["engine=megatron", "megatron.container=", f"run_dir={tmp_path}", *ON_SLURM,
                          "cluster.gpus_per_node=2", "cluster.request_gpus=false"])
    probe = textwrap.dedent("""
        import json, os, socket, torch, torch.distributed as dist
        dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        total = torch.tensor([dist.get_rank() + 1]); dist.all_reduce(total)
        keys = ["SLURM_PROCID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
        print("PROBE " + json.dumps({**{k: os.environ.get(k) for k in keys}, "sum": int(total), "host": socket.gethostname()}), flush=True)
        dist.destroy_process_group()
    """)
    (tmp_path / "slurm").mkdir()  # the job's log dir
    script = tmp_path / "probe.sbatch"
    script.write_text(render_script(cfg, command=f"python -c {shlex.quote(probe)}"))
    job = sbatch(script)
    info = wait_for([job], timeout=120)[job]
    log = (tmp_path / "slurm" / f"sft-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    probes = [json.loads(line.split("PROBE ", 1)[1]) for line in log.splitlines() if line.startswith("PROBE ")]
    assert sorted(p["SLURM_PROCID"] for p in probes) == ["0", "1"]
    assert all(p["RANK"] == p["SLURM_PROCID"] == p["LOCAL_RANK"] and p["WORLD_SIZE"] == "2" for p in probes)
    assert {p["MASTER_ADDR"] for p in probes} == {probes[0]["host"]}  # the job's first (only) node
    assert len({p["MASTER_PORT"] for p in probes}) == 1
    assert [p["sum"] for p in probes] == [3, 3]  # 1 + 2: both ranks joined one process group


@pytest.mark.slow
def test_megatron_stage_gets_sigterm_on_usr1_and_is_requeued(slurm, tmp_path):
    """Megatron-Bridge checkpoints on SIGTERM (train.exit_signal_handler): on USR1 the rendered script
    signals the job step's tasks with TERM; a task that then exits 75 (as bridge_sft does after
    its checkpoint) gets the job requeued, and the restarted job runs to completion."""
    cfg = compose("sft", ["engine=megatron", "megatron.container=", f"run_dir={tmp_path}", *ON_SLURM,
                          "cluster.time=1", "cluster.signal_seconds=30", "cluster.gpus_per_node=1",
                          "cluster.request_gpus=false"])
    probe = textwrap.dedent("""
        import os, signal, sys, time
        if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            print("PROBE resumed", flush=True); sys.exit(0)
        got = []
        signal.signal(signal.SIGTERM, lambda *_: got.append(time.time()))
        deadline = time.time() + 120
        while not got and time.time() < deadline:
            time.sleep(0.2)
        print("PROBE term" if got else "PROBE no-term", flush=True)
        sys.exit(75 if got else 1)
    """)
    (tmp_path / "slurm").mkdir()
    script = tmp_path / "probe.sbatch"
    script.write_text(render_script(cfg, command=f"python -c {shlex.quote(probe)}"))
    job = sbatch(script)
    info = wait_for([job], timeout=240)[job]
    log = (tmp_path / "slurm" / f"sft-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert [line for line in log.splitlines() if line.startswith("PROBE ")] == ["PROBE term", "PROBE resumed"]


@pytest.mark.slow
def test_preempted_stage_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """--time=1 with USR1 30 s before the end: the sft stage stops at a step boundary with a checkpoint,
    the job requeues itself and the restarted job resumes there: every step is trained exactly once."""
    max_steps = 100  # > 25 s of training even when the CPU is free: USR1 comes 17-26 s after the start
    data = run_cli("-m", "data_prep", "--source", str(SAMPLE_DIR), "--out", str(tmp_path / "data"), "--no-progress")
    assert data.returncode == 0, data.stderr
    cfg = compose("sft", [f"run_dir={tmp_path}", *ON_SLURM, "cluster.time=1", "cluster.signal_seconds=30",
                          f"train.max_steps={max_steps}", "train.save_steps=1000", "train.logging_steps=1"])
    result = submit_stage(cfg)
    job = str(result["value"])
    # Once requeued, lift the limit: on a shared 2-core machine a step takes 0.3-1 s, so a second
    # 1-minute run might be preempted again (that works too, but makes the test's time unpredictable).
    deadline = time.monotonic() + 120
    while scontrol_job(job).get("Restarts", "0") == "0" and scontrol_job(job).get("JobState") not in FINAL_STATES:
        assert time.monotonic() < deadline, "no requeue within 120 s"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True)
    info = wait_for([job], timeout=300)[job]
    log = (tmp_path / "slurm" / f"sft-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert int(info["Restarts"]) >= 1, log[-3000:]
    stops = [int(s) for s in re.findall(r"preempted: checkpoint-(\d+) saved", log)]
    assert stops and all(0 < s < max_steps for s in stops), log[-3000:]
    assert log.count("requeueing job") == len(stops)
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["steps"] == max_steps
    # Each training step logs its loss once: a restart from scratch would log the first steps twice.
    assert len(re.findall(r"\{'loss': ", log)) == max_steps
    assert (tmp_path / "sft" / "final" / "config.json").is_file()
    assert not (tmp_path / "sft" / ".lock").exists()


def test_failed_stage_cancels_its_dependents(slurm, tmp_path):
    stages = {s: [f"run_dir={tmp_path}", *ON_SLURM] for s in ("data", "sft", "rm", "rl", "eval")}
    stages["data"].append(f"prep.source={tmp_path}/no-such-dir")
    cfgs = {s: compose(s, a) for s, a in stages.items()}
    job_ids = submit_pipeline(cfgs, {name: list(e.needs) for name, e in load_preset("default")[1].items()})
    infos = wait_for(job_ids.values(), timeout=120)  # none may stay PENDING (DependencyNeverSatisfied)
    states = {stage: infos[j]["JobState"] for stage, j in job_ids.items()}
    assert states == {"data": "FAILED", "sft": "CANCELLED", "rm": "CANCELLED", "rl": "CANCELLED", "eval": "CANCELLED"}
    assert not (tmp_path / "sft").exists()  # no dependent ever started


@pytest.mark.slow
def test_tiny_pipeline_through_sbatch(slurm, tmp_path):
    """data -> (sft, rm) -> rl -> eval as five jobs chained with afterok, then `status`."""
    run_dir = tmp_path / "run"
    proc = run_cli("-m", "launcher", "pipeline", f"run_dir={run_dir}", "model=tiny", *ON_SLURM,
                   f"data:prep.source={SAMPLE_DIR}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads((run_dir / "jobs.json").read_text())
    assert list(jobs) == ["data", "sft", "rm", "rl", "eval"]
    assert jobs["rl"]["after"] == [jobs["sft"]["job_id"], jobs["rm"]["job_id"]]
    assert jobs["eval"]["after"] == [jobs["rl"]["job_id"]]
    for stage, entry in jobs.items():
        assert f"{stage}: job {entry['job_id']}" in proc.stdout
    infos = wait_for([e["job_id"] for e in jobs.values()], timeout=600)
    logs = {s: Path(e["log"]).read_text() if Path(e["log"]).exists() else "" for s, e in jobs.items()}
    assert {s: infos[e["job_id"]]["JobState"] for s, e in jobs.items()} == dict.fromkeys(jobs, "COMPLETED"), \
        "\n".join(f"--- {s}\n{log[-1500:]}" for s, log in logs.items())

    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest and (run_dir / "data" / "sft" / "train.jsonl").stat().st_size > 0
    for stage in ("sft", "rm", "rl"):
        summary = json.loads((run_dir / stage / "summary.json").read_text())
        assert summary["stage"] == stage and isinstance(summary["value"], (int, float)), summary
        assert (run_dir / stage / "final" / "config.json").is_file()
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report
    # each stage started after the ones it needs had finished
    start = {s: infos[e["job_id"]]["StartTime"] for s, e in jobs.items()}
    end = {s: infos[e["job_id"]]["EndTime"] for s, e in jobs.items()}
    assert end["data"] <= start["sft"] and end["data"] <= start["rm"]
    assert max(end["sft"], end["rm"]) <= start["rl"] and end["rl"] <= start["eval"]

    status = run_cli("-m", "launcher", "status", str(run_dir))
    assert status.returncode == 0, status.stderr
    for stage, entry in jobs.items():
        row = next(line for line in status.stdout.splitlines() if f" {stage} " in line and entry["job_id"] in line)
        assert "COMPLETED" in row
    assert status.stdout.strip().splitlines()[-1] == "5 stages: 5 finished"


@pytest.mark.slow
def test_system_chain_and_dpo_through_sbatch(slurm, tmp_path, tiny_model_dir):
    """The stages the edit pipeline does not submit, as real jobs: the `system_smoke` chain (feedback,
    select, their evals and its, three chains after data) and a dpo job after its sft. its starts
    `python -m eval.serve` in vLLM's place; its policy is a model dir (a served model must be one)."""
    run_dir = tmp_path / "run"
    serve = "its.server_command=python -m eval.serve --model {model} --port {port} --name {name}"
    proc = run_cli("-m", "launcher", "pipeline", "preset=system_smoke", f"run_dir={run_dir}", *ON_SLURM,
                   f"its:{serve}", f"its:policy={tiny_model_dir}", "its:its.server_start_timeout_s=300", timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads((run_dir / "jobs.json").read_text())
    assert list(jobs) == list(load_preset("system_smoke")[1])
    assert set(jobs["its"]["after"]) == {jobs[n]["job_id"] for n in ("feedback", "rl", "select")}
    dpo_files = write_job(compose("dpo", [f"run_dir={run_dir}", *ON_SLURM, "train.max_steps=2", "train.save_steps=2"]))
    ids = {**{n: e["job_id"] for n, e in jobs.items()}, "dpo": sbatch(dpo_files["script"], after=[jobs["sft"]["job_id"]])}
    infos = wait_for(ids.values(), timeout=900)
    logs = {n: "".join(p.read_text() for p in (run_dir / "slurm").glob(f"{n}-*.log")) for n in ids}
    assert {n: infos[j]["JobState"] for n, j in ids.items()} == dict.fromkeys(ids, "COMPLETED"), \
        "\n".join(f"--- {n}\n{log[-1500:]}" for n, log in logs.items() if infos[ids[n]]["JobState"] != "COMPLETED")
    for name in ("feedback", "select", "dpo"):
        summary = json.loads((run_dir / name / "summary.json").read_text())
        assert summary["stage"] == name and (run_dir / name / "final" / "config.json").is_file()
    assert json.loads((run_dir / "eval_feedback" / "report.json").read_text())
    assert json.loads((run_dir / "eval_select" / "report.json").read_text())
    results = [json.loads(line) for line in (run_dir / "its" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 2 and all(r["final"] for r in results)


def test_a_finished_stage_whose_input_is_remade_is_submitted_again_after_it(tmp_path):
    """sft finished earlier, but data (which sft needs) has not: data is submitted, so sft must be too, after
    it, and everything that needs sft after sft (not started at once on the old sft/final)."""
    from recipes.config import to_yaml

    run_dir = tmp_path / "run"
    (run_dir / "sft").mkdir(parents=True)
    sft = compose("sft", [f"run_dir={run_dir}", *ON_SLURM])
    (run_dir / "sft" / "config.yaml").write_text(to_yaml(sft))
    (run_dir / "sft" / "summary.json").write_text(json.dumps({"stage": "sft", "metric": "loss", "value": 1.0}))

    def submitted():
        proc = run_cli("-m", "launcher", "pipeline", f"run_dir={run_dir}", *ON_SLURM, "--dry-run", timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout, dict(re.findall(r"^# ---- (\w+): sbatch --parsable(?: --dependency=afterok:(\S+))? ", proc.stdout,
                                            flags=re.M))

    out, jobs = submitted()
    assert jobs == {"data": "", "sft": "$DATA_JOB", "rm": "$SFT_JOB", "rl": "$SFT_JOB:$RM_JOB", "eval": "$RL_JOB"}, out
    # once data is finished too, sft is not submitted and nothing waits for it
    data = compose("data", [f"run_dir={run_dir}", *ON_SLURM])
    (run_dir / "data").mkdir()
    (run_dir / "data" / "config.yaml").write_text(to_yaml(data))
    (run_dir / "data" / "summary.json").write_text(json.dumps({"stage": "data", "metric": "rows", "value": 1}))
    out, jobs = submitted()
    assert f"sft: finished earlier with the same config ({run_dir}/sft), not submitted" in out
    assert jobs == {"rm": "", "rl": "$RM_JOB", "eval": "$RL_JOB"}, out
