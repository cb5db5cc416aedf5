"""PROBE, not NeMo-RL: stands in for NeMo-RL v0.7.0's examples/run_{rm,grpo,dpo}.py (they need GPUs and
NeMo-RL's container) at megatron.nemo_rl_dir in the SLURM execution tests (tests/test_slurm_exec.py).

Run by our wrapper (recipes/megatron/nemo_rl.py, `runpy.run_path(entry)`) on the Ray head node, as the
real entry point is. It records, as JSON in $PROBE_RECORD:
  argv, the distributed environment (MASTER_ADDR, RAY_HEAD_IP, RANK/WORLD_SIZE/LOCAL_RANK, hostname),
  whether HF_TOKEN arrived (its SHA-256, never the value), the config file it was given (its path and
  top-level keys), and the Ray cluster it joins with ray.init(address="auto") - the way NeMo-RL's
  init_ray connects to the cluster ray.sub started: every alive node's address and resources, and the
  hostname a task pinned to each node reports (a worker on another node really runs work).
It checks what NeMo-RL needs before it would start: `--config FILE` exists and parses, and the Ray
cluster has $PROBE_EXPECT_NODES nodes; otherwise it exits 3. What only a GPU cluster verifies: that
NeMo-RL itself trains with that config on those GPUs (tests/gpu/run_gpu_checks.sh).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path


def main() -> None:
    import ray
    import yaml
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    record: dict = {"probe": "nemo_rl_entry", "argv": sys.argv, "host": socket.gethostname(),
                    "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "RAY_HEAD_IP", "RANK", "WORLD_SIZE",
                                                           "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_JOB_NUM_NODES")}}
    token = os.environ.get("HF_TOKEN")
    record["hf_token_sha256"] = hashlib.sha256(token.encode()).hexdigest() if token else None
    errors = []
    config = sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else None
    if config and Path(config).is_file():
        record["config"] = {"path": config, "keys": sorted(yaml.safe_load(Path(config).read_text()) or {})}
    else:
        errors.append(f"--config missing or not a file: {config}")

    ray.init(address="auto", logging_level="ERROR")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    record["ray_nodes"] = [{"address": n["NodeManagerAddress"], "resources": n["Resources"]} for n in nodes]

    @ray.remote(num_cpus=1)
    def where() -> str:
        return socket.gethostname()

    record["task_hosts"] = ray.get([
        where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes])
    ray.shutdown()
    expected = int(os.environ.get("PROBE_EXPECT_NODES", "1"))
    if len(nodes) != expected:
        errors.append(f"Ray cluster has {len(nodes)} nodes, expected {expected}")
    record["errors"] = errors
    Path(os.environ["PROBE_RECORD"]).write_text(json.dumps(record, indent=1))
    print(f"PROBE nemo_rl_entry: {len(nodes)} Ray node(s), errors: {errors or 'none'}", flush=True)
    if errors:
        sys.exit(3)
