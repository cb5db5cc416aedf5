"""`./launch.sh pipeline engine=megatron` submitted to the real 2-node test SLURM (tests/slurm_cluster.sh), end to
end: data, import -> sft -> sft_export -> rm -> rm_export -> rl -> rl_export -> eval, nine jobs chained with
afterok, each run by the batch script launcher/slurm.py renders (sft as one task per GPU-rank on both nodes,
rm and rl as a Ray cluster with the stage on its head).

Everything is our code or upstream's, except at the GPU entry points, where PROBES record what they receive and
write only what the next job needs (tests/probes, tests/megatron_probe; each says so): Megatron-Bridge's finetune
and conversion worker (which runs Megatron-Bridge's own destination check), NeMo-RL's run_rm.py / run_grpo.py
(checkpoints laid out and saved by NeMo-RL's own CheckpointManager and save_checkpoint) and its Megatron
converter (which runs NeMo-RL's own refusal). NeMo-RL's DCP->HF converter runs for real in rm_export, our
reward-model config step after it; the eval loads rl/final and scores with rm/final as its proxy reward model.

The test behind "resubmit is safe" (docs/megatron.md):
  1. submitted with sft held half-way (its finetune probe waits), sft is killed (scancel) once both ranks are in
     finetune: SLURM cancels everything behind it (--kill-on-invalid-dep);
  2. resubmitted: data and import, finished, are not submitted again; sft runs again (its own output dir, same
     config) and the chain completes;
  3. resubmitted: nothing is submitted, nothing is cancelled, no output changes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.config import REPO_ROOT
from launcher.slurm import scontrol_job
from tests.test_slurm_jobs import wait_for
from tests.upstream import source

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROBES = REPO_ROOT / "tests" / "probes"
ENTRIES = ["data", "import", "sft", "sft_export", "rm", "rm_export", "rl", "rl_export", "eval"]


def outputs(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file the chain wrote (outside slurm/ and jobs.json), with size and mtime."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and not str(p.relative_to(run_dir)).startswith(("slurm/", "jobs.json", ".doctor"))}


def submit(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher", "pipeline", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def jobs(run_dir: Path) -> dict[str, str]:
    return {name: entry["job_id"] for name, entry in json.loads((run_dir / "jobs.json").read_text()).items()}


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not after {timeout} s: {what}")
        time.sleep(1)


def test_megatron_chain_runs_on_slurm_and_resubmitting_it_is_safe(slurm, tiny_model_dir, tmp_path):
    start = time.monotonic()
    nemo_rl = source("nemo_rl", "git")
    mb_scripts = source("megatron_bridge", "git") / "scripts" / "conversion"
    mb_wheel, mcore_wheel = source("megatron_bridge", "wheel"), source("megatron_core", "wheel")
    run_dir = tmp_path / "run"
    # the image's launcher of its Megatron environment (NeMo-RL's frozen env): here this venv's python
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python-MegatronPolicyWorker").write_text(
        '#!/bin/bash\nexport PROBE_MCORE_LAUNCHER=python-MegatronPolicyWorker\nexec python "$@"\n')
    (shims / "python-MegatronPolicyWorker").chmod(0o755)
    nemo_rl_only = tmp_path / "nemo_rl_src"  # NeMo-RL's package alone (its tree's `tests` must not shadow ours)
    nemo_rl_only.mkdir()
    (nemo_rl_only / "nemo_rl").symlink_to(nemo_rl / "nemo_rl", target_is_directory=True)
    hold = tmp_path / "HOLD_SFT"
    hold.write_text("sft's finetune probe waits while this file exists")
    record = tmp_path / "record.jsonl"
    probe_log = tmp_path / "megatron_bridge_probe.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests" / "megatron_probe"), str(nemo_rl_only)]),
           "PROBE_LOG": str(probe_log), "PROBE_RECORD": str(record), "PROBE_MB_SCRIPTS": str(mb_scripts),
           "PROBE_MB_WHEEL": str(mb_wheel), "PROBE_MCORE_WHEEL": str(mcore_wheel)}
    args = [
        "engine=megatron", "model=tiny", f"run_dir={run_dir}", "executor=slurm", "cluster=local", "cluster.time=30",
        "cluster.signal_seconds=60", "megatron.setup_minutes=1",
        f"cluster.setup=[source {REPO_ROOT}/.venv/bin/activate,export PATH={shims}:$PATH]",
        "megatron.container=", "megatron.nemo_rl_container=", "cluster.container_image=",
        f"megatron.hf_model_id={tiny_model_dir}", f"megatron.megatron_bridge_dir={PROBES / 'megatron_bridge'}",
        f"megatron.nemo_rl_dir={PROBES / 'nemo_rl'}", f"rm_export:megatron.nemo_rl_dir={nemo_rl}",
        "parallel.nodes=1", "parallel.gpus_per_node=1", "cluster.gpus_per_node=1", "cluster.request_gpus=false",
        "tp=1", "pp=1", "sp=false", "gbs=2", "mbs=1", "train.max_steps=2", "megatron.reward_model_nodes=1",
        "data:prep.source=data_prep/sample", "data:prep.max_seq_len=1024", f"import:init={tiny_model_dir}",
        "sft:parallel.nodes=2", "rm:parallel.fsdp=true",
        "eval:eval.max_rows=4", "eval:eval.max_new_tokens=8", "eval:eval.bootstrap_samples=100",
    ]

    # ---- 1. submit; sft is killed half-way --------------------------------------------------------------
    first = submit(args, {**env, "PROBE_HOLD": str(hold)})
    submitted = jobs(run_dir)
    assert list(submitted) == ENTRIES, first.stdout
    wait_until(lambda: probe_log.is_file() and sum(json.loads(line)["event"] == "finetune"
                                                   for line in probe_log.read_text().splitlines()) == 2,
               300, "both sft ranks in finetune")
    infos = {name: scontrol_job(submitted[name]) for name in ("data", "import", "sft")}
    assert infos["data"]["JobState"] == infos["import"]["JobState"] == "COMPLETED"
    assert infos["sft"]["JobState"] == "RUNNING" and infos["sft"]["NumNodes"] == "2"
    subprocess.run(["scancel", submitted["sft"]], check=True)
    behind = [submitted[name] for name in ENTRIES[3:]]
    states = wait_for([submitted["sft"], *behind], timeout=120)
    assert {j: i["JobState"] for j, i in states.items()} == dict.fromkeys([submitted["sft"], *behind], "CANCELLED")
    hold.unlink()
    before_resubmit = outputs(run_dir)

    # ---- 2. resubmit: exactly the killed job (and what never ran behind it) runs -------------------------
    second = submit(args, env)
    assert [line.split(":")[0] for line in second.stdout.splitlines() if ": job " in line] == ENTRIES[2:], second.stdout
    resubmitted = jobs(run_dir)
    assert {name: resubmitted[name] == submitted[name] for name in ENTRIES} == \
        {name: name in ("data", "import") for name in ENTRIES}
    final = wait_for([resubmitted[name] for name in ENTRIES[2:]], timeout=900)
    logs = {name: Path(json.loads((run_dir / "jobs.json").read_text())[name]["log"]) for name in ENTRIES}
    states = {name: final[resubmitted[name]]["JobState"] for name in ENTRIES[2:]}
    assert states == dict.fromkeys(ENTRIES[2:], "COMPLETED"), {n: logs[n].read_text()[-2500:] for n in ENTRIES[2:]
                                                               if states[n] != "COMPLETED"}
    for name in ("data", "import"):  # not rerun: their outputs are as they were
        assert {k: v for k, v in outputs(run_dir).items() if k.startswith(f"{name}/")} == \
            {k: v for k, v in before_resubmit.items() if k.startswith(f"{name}/")}

    # what each job handed to the next
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    conversions = [c["argv"][0] for c in calls if c["probe"] == "run_conversion"]
    assert conversions == ["import", "export"]  # once each, into the convert job's staging dir
    [megatron_export] = [c for c in calls if c["probe"] == "convert_megatron_to_hf"]
    assert megatron_export["launcher"] == "python-MegatronPolicyWorker"  # rl_export in the mcore environment
    events = [json.loads(line) for line in probe_log.read_text().splitlines()]
    finetunes = [e for e in events if e["event"] == "finetune"]
    assert len(finetunes) == 4 and {e["rank"] for e in finetunes} == {"0", "1"}  # killed launch + resumed one
    assert f"checkpoint.pretrained_checkpoint={run_dir / 'import' / 'converted'}" in finetunes[-1]["overrides"]
    rm_final = json.loads((run_dir / "rm" / "final" / "config.json").read_text())
    assert rm_final["architectures"] == ["LlamaForSequenceClassification"]  # NeMo-RL's converter + our config
    assert json.loads((run_dir / "rl" / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    report = json.loads(next((run_dir / "eval").rglob("report.json")).read_text())
    assert report["meta"]["proxy_reward_model"] == str(run_dir / "rm" / "final")
    assert report["meta"]["provenance"]["scorers"]["proxy_rm"]["kind"] == "seqcls" and report["rm_accuracy"] is not None
    for name in ("import", "sft_export", "rm_export", "rl_export"):
        summary = json.loads((run_dir / name / "summary.json").read_text())
        assert summary["metric"] == "converted" and summary["dest_fingerprint"]

    # ---- 3. resubmit a finished chain: nothing runs, nothing is cancelled --------------------------------
    done = outputs(run_dir)
    third = submit(args, env)
    assert third.stdout.strip().splitlines()[-1] == "nothing to submit", third.stdout
    assert jobs(run_dir) == resubmitted
    assert {name: scontrol_job(resubmitted[name])["JobState"] for name in ENTRIES} == dict.fromkeys(ENTRIES, "COMPLETED")
    assert scontrol_job(str(int(max(resubmitted.values(), key=int)) + 1)) == {}  # no job was created since
    assert outputs(run_dir) == done
    print(f"megatron chain on SLURM: kill + resubmit + no-op resubmit in {time.monotonic() - start:.0f} s")
