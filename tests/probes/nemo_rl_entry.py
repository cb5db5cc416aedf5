"""PROBE, not NeMo-RL: stands in for NeMo-RL v0.7.0's examples/run_{rm,grpo,dpo}.py (they need GPUs and
NeMo-RL's container) at megatron.nemo_rl_dir in the SLURM tests (tests/test_slurm_exec.py,
tests/test_megatron_chain_slurm.py).

Run by our wrapper (recipes/megatron/nemo_rl.py, `runpy.run_path(entry)`) on the Ray head node, as the
real entry point is. It records, as JSON in $PROBE_ENTRY_RECORD (when set):
  argv, the distributed environment (MASTER_ADDR, RAY_HEAD_IP, RANK/WORLD_SIZE/LOCAL_RANK, hostname),
  whether HF_TOKEN arrived (its SHA-256, never the value), the config file it was given (its path and
  top-level keys), and the Ray cluster it joins with ray.init(address="auto") - the way NeMo-RL's
  init_ray connects to the cluster ray.sub started: every alive node's address and resources, and the
  hostname a task pinned to each node reports (a worker on another node really runs work).
It checks what NeMo-RL needs before it would start: `--config FILE` exists and parses, and the Ray
cluster has $PROBE_EXPECT_NODES nodes; otherwise it exits 3.

Then it writes what the export after it needs, with NeMo-RL's own code (from the pinned source on the path):
one checkpoint step laid out by nemo_rl.utils.checkpoint.CheckpointManager (init_tmp_checkpoint writes
training_info.json and config.yaml, finalize_checkpoint renames tmp_step_N to step_N: checkpoint.py:195-266),
at checkpointing.checkpoint_dir of the config it was given, with no metric (nothing was trained or
validated). Its policy weights: for a reward model (policy.reward_model_cfg.enabled), the sequence classifier
NeMo-RL's DTensor worker builds from policy.model_name (num_labels=1, dtensor_policy_worker.py:296-311), not
trained, saved by native_checkpoint.save_checkpoint with the tokenizer (rm.py:643-664); for a Megatron policy
(rl, dpo), an iter_0000000 directory with this record in it (its converter is a probe too). What only a GPU
cluster verifies: that NeMo-RL trains with that config on those GPUs (tests/gpu/).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path


def ray_cluster(record: dict, errors: list[str]) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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


def write_checkpoint(document: dict) -> str:
    from pydantic import BaseModel

    from nemo_rl.utils.checkpoint import CheckpointManager

    class RunConfig(BaseModel):  # what init_tmp_checkpoint dumps into step_N/config.yaml: the config received
        model_config = {"extra": "allow"}

    checkpointing = {"save_optimizer": False, "higher_is_better": False, "metric_name": None, "keep_top_k": None,
                     **document["checkpointing"]}
    manager = CheckpointManager(checkpointing)
    step = Path(manager.init_tmp_checkpoint(1, {"step": 1, "probe": True}, RunConfig(**document)))
    policy = document["policy"]
    weights = step / "policy" / "weights"
    if (policy.get("reward_model_cfg") or {}).get("enabled"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from nemo_rl.utils.native_checkpoint import save_checkpoint

        model = AutoModelForSequenceClassification.from_pretrained(policy["model_name"], num_labels=1)
        save_checkpoint(model, str(weights), tokenizer=AutoTokenizer.from_pretrained(policy["tokenizer"]["name"]),
                        tokenizer_path=str(step / "policy" / "tokenizer"))
    else:
        (weights / "iter_0000000").mkdir(parents=True)
        (weights / "iter_0000000" / "PROBE_ENTRY_RECORD.json").write_text(json.dumps({"probe": "nemo_rl_entry"}))
    manager.finalize_checkpoint(step)
    return str(step.parent / "step_1")


def main() -> None:
    import yaml

    record: dict = {"probe": "nemo_rl_entry", "argv": sys.argv, "host": socket.gethostname(),
                    "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "RAY_HEAD_IP", "RANK", "WORLD_SIZE",
                                                           "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_JOB_NUM_NODES")}}
    token = os.environ.get("HF_TOKEN")
    record["hf_token_sha256"] = hashlib.sha256(token.encode()).hexdigest() if token else None
    errors: list[str] = []
    config = sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else None
    document = yaml.safe_load(Path(config).read_text()) if config and Path(config).is_file() else None
    if document:
        record["config"] = {"path": config, "keys": sorted(document)}
    else:
        errors.append(f"--config missing or not a file: {config}")
    ray_cluster(record, errors)
    if document and not errors:
        record["checkpoint"] = write_checkpoint(document)
    record["errors"] = errors
    if os.environ.get("PROBE_ENTRY_RECORD"):
        Path(os.environ["PROBE_ENTRY_RECORD"]).write_text(json.dumps(record, indent=1))
    print(f"PROBE nemo_rl_entry: {len(record.get('ray_nodes', []))} Ray node(s), errors: {errors or 'none'}", flush=True)
    if errors:
        sys.exit(3)
