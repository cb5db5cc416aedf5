"""`./launch.sh doctor cluster=NAME` on the real 2-node test SLURM (tests/slurm_cluster.sh), with the hub
check against a local HTTP server (HF_ENDPOINT, the variable huggingface_hub reads too)."""
from __future__ import annotations

import http.server
import socket
import threading

import pytest

from recipes.config import compose
from launcher.doctor import check_hf_model
from tests.conftest import run_cli

MODEL = "meta-llama/Llama-3.3-70B-Instruct"


@pytest.fixture
def hub():
    """A local stand-in for the hub's HEAD /MODEL/resolve/main/config.json: 200 with the right token, else 401."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.path != f"/{MODEL}/resolve/main/config.json":
                self.send_response(404)
            else:
                self.send_response(200 if self.headers.get("Authorization") == "Bearer hf_good" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def lines(stdout: str) -> dict[str, str]:
    """check name -> 'STATUS detail'"""
    out = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition("  ")
        if status in ("PASS", "FAIL", "SKIP"):
            name, _, detail = rest.strip().partition(" ")
            out[name] = f"{status} {detail.strip()}"
    return out


@pytest.mark.slurm
def test_doctor_passes_on_a_ready_cluster(slurm, hub, tmp_path):
    endpoint, seen = hub
    proc = run_cli("-m", "launcher", "doctor", "cluster=local", "cluster.partition=test", "model=tiny",
                   f"megatron.hf_model_id={MODEL}", "megatron.container=", f"run_dir={tmp_path / 'run'}",
                   env={"HF_TOKEN": "hf_good", "HF_ENDPOINT": endpoint}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = lines(proc.stdout)
    assert list(checks) == ["commands", "account", "partition", "gpus", "container", "shared-fs", "hf-token", "hf-model", "disk"]
    assert checks["partition"] == "PASS partition test is UP with 2 nodes (the sft plan needs 1)"
    assert checks["container"].startswith("SKIP no container configured")
    assert checks["shared-fs"].startswith("PASS job ") and " on n" in checks["shared-fs"]  # a compute node wrote it
    assert checks["hf-model"] == f"PASS {MODEL} reachable on {endpoint} (HTTP 200)"
    assert seen == [(f"/{MODEL}/resolve/main/config.json", "Bearer hf_good")]
    assert checks["disk"].startswith("PASS ")
    assert not list((tmp_path / "run" / ".doctor").glob("written-by-job-*"))  # cleaned up
    assert "hf_good" not in proc.stdout


@pytest.mark.slurm
def test_doctor_names_each_failure_and_what_to_do(slurm, hub, tmp_path):
    endpoint, _ = hub
    proc = run_cli("-m", "launcher", "doctor", "cluster=local", "cluster.partition=nope", "cluster.gpus_per_node=8",
                   f"run_dir={tmp_path / 'run'}", env={"HF_TOKEN": "hf_bad", "HF_ENDPOINT": endpoint}, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    checks = lines(proc.stdout)
    assert checks["partition"].startswith("FAIL partition nope does not exist (partitions: test) -> set cluster.partition")
    assert checks["gpus"].startswith("FAIL cannot read the partition's nodes")
    # the Megatron engine's pinned image is configured, and this SLURM has no pyxis
    assert checks["container"].startswith("FAIL srun has no --container-image (pyxis is not installed)")
    assert checks["shared-fs"].startswith("FAIL the one-minute test job was refused")
    assert checks["hf-model"].startswith(f"FAIL {MODEL}: HTTP 401 -> accept the license")
    # the paper's 70B (the doctor's default model): ~1 TB per checkpoint, more than this machine's disk
    assert checks["disk"].startswith("FAIL ") and "one llama33_70b checkpoint with optimizer state is 0.99 TB" in checks["disk"]
    assert proc.stdout.strip().splitlines()[-1] == f"doctor: {sum(v.startswith('FAIL') for v in checks.values())} check(s) failed"


@pytest.mark.slurm
def test_doctor_counts_gpus_in_the_nodes_gres(slurm, tmp_path):
    proc = run_cli("-m", "launcher", "doctor", "cluster=local", "cluster.partition=test", "cluster.gpus_per_node=8",
                   "model=tiny", "gbs=16", "mbs=1", "megatron.container=", f"run_dir={tmp_path}", env={"HF_TOKEN": "x"},
                   timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines(proc.stdout)["gpus"].startswith("FAIL 2 of 2 nodes of test have fewer than 8 GPUs in their Gres (e.g. n1: 0)")


def test_unreachable_hub_is_a_failed_check_with_what_to_do(monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    status, detail = check_hf_model(compose("sft", ["engine=megatron", "model=llama33_70b"]))
    assert status == "FAIL"
    assert detail.startswith(f"http://127.0.0.1:{port} is unreachable from here (")
    assert detail.endswith("allow outbound HTTPS, or download it to the shared file system and set model.path to that directory")
