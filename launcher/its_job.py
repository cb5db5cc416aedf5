"""`./launch.sh its executor=slurm cluster=NAME`: the its stage as one SLURM job on one node that serves
its own models.

launcher/slurm.py renders the batch script (a single task holding the node's GPUs) and runs
`python -m launcher.its_job CONFIG` in it. That process:
  1. plans one server per distinct local model dir (a dir used as policy and feedback model is served
     once): its GPU count (tensor parallel size) from the model files (weights x its.memory_headroom /
     parallel.gpu_memory_gb, rounded up to a power of two that divides the attention heads), GPUs given
     out in order from the job's CUDA_VISIBLE_DEVICES (or 0..gpus_per_node-1);
  2. starts them: generators with its.server_command (default `vllm serve`), the select model with
     its.rm_server_command (default `python -m eval.serve_rm`, which scores both reward-model kinds), each
     on a free port of 127.0.0.1 with CUDA_VISIBLE_DEVICES = its GPUs, logging to OUT/servers/NAME.log;
  3. waits until each answers GET /health (a server that exits or is not up within
     its.server_start_timeout_s is an error naming its log);
  4. runs the loop against them (endpoints already given as URLs are used as they are);
  5. stops every server (SIGTERM, then SIGKILL after 30 s), also when the loop fails.
All models must fit one node (cluster.gpus_per_node GPUs): the plan is checked when the job is rendered
(for the model dirs that exist by then: a pipeline's own checkpoints are checked in the job).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from eval.engines import is_endpoint
from recipes.config import ConfigError
from hs3.io import UserError, cli_main

GENERATOR_ROLES = ("policy", "feedback_model", "edit_model")


def weights_bytes(path: str) -> int:
    files = [p for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".gguf")]
    return sum(p.stat().st_size for p in files)


def gpus_for(path: str, cfg) -> int:
    """Tensor-parallel size of one model's server (0 on a node without GPUs)."""
    if cfg.cluster.gpus_per_node <= 0:
        return 0
    need = weights_bytes(path) * cfg.its.memory_headroom / (cfg.parallel.gpu_memory_gb * 1e9)
    tp = 1
    while tp < need:
        tp *= 2
    try:
        heads = int(json.loads((Path(path) / "config.json").read_text()).get("num_attention_heads", tp))
    except (OSError, ValueError):
        heads = tp
    while tp <= heads and heads % tp:  # vLLM splits the attention heads evenly over the TP ranks
        tp *= 2
    if tp > heads:
        raise ConfigError(f"its on SLURM: {path} needs {need:.1f} GPUs of {cfg.parallel.gpu_memory_gb} GB "
                          f"(x its.memory_headroom={cfg.its.memory_headroom}); no tensor-parallel size up to its "
                          f"{heads} attention heads fits")
    return tp


def plan(cfg, at_submit: bool = False) -> list[dict]:
    """The servers the job starts: [{name, roles, model, kind: generate|score, gpus: n}], checked to fit a node.
    At submission a model dir may not exist yet (an earlier job of the pipeline writes it): it is planned
    then with gpus None and checked in the job, where the plan is made again from the files."""
    its = cfg.its
    servers: list[dict] = []
    for role in (*GENERATOR_ROLES, "select_model"):
        spec = its[role]
        if not spec:
            raise ConfigError(f"its.{role} is not set (a checkpoint dir or an endpoint)")
        if is_endpoint(str(spec)):
            continue
        exists = Path(spec).is_dir()
        if not exists and not at_submit:
            raise ConfigError(f"its.{role}={spec}: no such directory")
        kind = "score" if role == "select_model" else "generate"
        same = next((s for s in servers if s["model"] == str(spec) and s["kind"] == kind), None)
        if same:
            same["roles"].append(role)
            continue
        servers.append({"name": f"{role.removesuffix('_model')}-{Path(spec).name}", "roles": [role], "model": str(spec),
                        "kind": kind, "gpus": gpus_for(str(spec), cfg) if exists else None})
    total = sum(s["gpus"] or 0 for s in servers)
    if cfg.cluster.gpus_per_node > 0 and total > cfg.cluster.gpus_per_node:
        layout = ", ".join(f"{s['name']}: {s['gpus']}" for s in servers)
        raise ConfigError(f"its on SLURM: the model servers need {total} GPUs ({layout}), a node has "
                          f"{cfg.cluster.gpus_per_node} (serve some models elsewhere and pass their endpoints)")
    return servers


def job_command(cfg, config_file: Path) -> list[str]:
    """What launcher/slurm.py runs in the job (the plan is checked now, before the queue wait)."""
    plan(cfg, at_submit=True)
    return ["python", "-m", "launcher.its_job", str(config_file)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def start_servers(cfg, servers: list[dict], log_dir: Path) -> list[dict]:
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        visible = [str(i) for i in range(max(cfg.cluster.gpus_per_node, 0))]
    log_dir.mkdir(parents=True, exist_ok=True)
    next_gpu = 0
    running = []
    for server in servers:
        port = _free_port()
        template = cfg.its.rm_server_command if server["kind"] == "score" else cfg.its.server_command
        command = template.format(model=shlex.quote(server["model"]), tp=max(server["gpus"], 1), port=port,
                                  name=shlex.quote(server["name"]))
        env = dict(os.environ)
        gpus = visible[next_gpu:next_gpu + server["gpus"]]
        next_gpu += server["gpus"]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        log = open(log_dir / f"{server['name']}.log", "ab")
        print(f"[its] starting {server['name']} ({', '.join(server['roles'])}) on GPUs [{','.join(gpus)}] port {port}: "
              f"{command}", file=sys.stderr, flush=True)
        proc = subprocess.Popen(shlex.split(command), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        running.append({**server, "port": port, "proc": proc, "log": str(log_dir / f"{server['name']}.log"),
                        "command": command})
    return running


def wait_healthy(running: list[dict], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(running)
    while pending:
        for server in list(pending):
            if server["proc"].poll() is not None:
                raise UserError(f"its: server {server['name']} exited with {server['proc'].returncode} before it was "
                                f"healthy (log: {server['log']})")
            if _healthy(server["port"]):
                print(f"[its] {server['name']} is up on port {server['port']}", file=sys.stderr, flush=True)
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            raise UserError(f"its: server(s) {', '.join(s['name'] for s in pending)} not healthy after {timeout_s:.0f}s "
                            f"(logs: {', '.join(s['log'] for s in pending)})")
        if pending:
            time.sleep(1)


def stop_servers(running: list[dict]) -> None:
    for server in running:
        if server["proc"].poll() is None:
            os.killpg(server["proc"].pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for server in running:
        try:
            server["proc"].wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(server["proc"].pid, signal.SIGKILL)
            server["proc"].wait()
        print(f"[its] stopped {server['name']} (exit {server['proc'].returncode})", file=sys.stderr, flush=True)


def endpoints_of(running: list[dict]) -> dict[str, str]:
    out = {}
    for server in running:
        url = f"http://127.0.0.1:{server['port']}" + ("/v1" if server["kind"] == "generate" else "")
        for role in server["roles"]:
            out[role] = url
    return out


@cli_main
def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from its.loop import run
    from recipes.config import RunConfig

    if len(argv) != 1:
        raise UserError("usage: python -m launcher.its_job CONFIG.yaml (the job's frozen config)")
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(argv[0]))
    servers = plan(cfg)
    running = []
    try:
        running = start_servers(cfg, servers, Path(cfg.out) / "servers")
        wait_healthy(running, cfg.its.server_start_timeout_s)
        run(cfg, endpoints=endpoints_of(running))
    finally:
        stop_servers(running)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
