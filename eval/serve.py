"""A small OpenAI-compatible chat-completions server around a transformers model.

    python -m eval.serve --model PATH [--port 8000] [--host 127.0.0.1] [--max-batch 16]
                         [--max-model-len N] [--max-tokens 256]

For tests, benchmarks and quick local scoring (`./launch.sh eval model=http://127.0.0.1:8000/v1`);
for a 70B model use vLLM, TRT-LLM or NIM, which speak the same protocol. Concurrent requests are
gathered into batches (up to --max-batch, waiting at most --batch-wait-ms for company) and generated
the way eval.engines.HFEngine generates (left padding, one model.generate per batch).

Every request is checked before it joins a batch, as vLLM does: a malformed one gets its own 400 with
a JSON error body ({"error": {"message", "type", "param", "code"}}) and never reaches the model, so it
cannot fail the requests batched with it. max_tokens must be at least 1 and fit the context
(--max-model-len, default the model's max_position_embeddings) with the prompt; temperature >= 0;
0 < top_p <= 1; seed a 64-bit integer. A client that disconnects cancels its generation at the next
decoding step. Server-side failures answer 500 "internal server error" and are logged here (stderr),
never sent to the client.

Endpoints: GET /v1/models, POST /v1/chat/completions (n=1, no streaming), GET /health (counters:
completions, batches, rejected, cancelled, decode_steps).
With --port 0 a free port is chosen; the first stdout line says where it listens.
"""
from __future__ import annotations

import argparse
import json
import math
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from hs3.io import UserError, cli_main

from eval.engines import Generation, HFEngine, Sampling, gpu_device_map

INT64 = (-(1 << 63), (1 << 63) - 1)
ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    """A request that fails validation: 400 with this message; `param` names the offending field."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclass
class Job:
    messages: list
    prompt: str
    sampling: Sampling
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{key} must be a finite number", key)
    return float(value)


def _integer(body: dict, key: str) -> Optional[int]:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer", key)
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)  # OpenAI's list-of-parts form, text parts only
    raise BadRequest(f"messages[{i}].content must be a string (or a list of text parts)", f"messages[{i}].content")


def parse_request(body, default_max_tokens: int, max_model_len: int) -> tuple[Sampling, list]:
    """The request's sampling and messages, or BadRequest. max_tokens is checked against the context
    later, once the prompt's length is known (check_length)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        clean.append({"role": m["role"], "content": _content(m, i)})
    n = _integer(body, "n")
    if n not in (None, 1):
        raise BadRequest("only n=1 is supported", "n")
    if body.get("stream"):
        raise BadRequest("streaming is not supported", "stream")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key)
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"{key} must be at least 1, got {max_tokens}", key)
    if max_tokens is not None and max_tokens > max_model_len:
        raise BadRequest(f"{key} must be at most {max_model_len} (the server's context length), got {max_tokens}", key)
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise BadRequest(f"temperature must be non-negative, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = _integer(body, "seed")
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise BadRequest("seed must be a 64-bit signed integer", "seed")
    sampling = Sampling(max_new_tokens=max_tokens or default_max_tokens, temperature=temperature, top_p=top_p,
                        seed=seed or 0)
    return sampling, clean


class Batcher:
    """One worker thread owns the model; request threads hand it validated jobs through a queue."""

    def __init__(self, engine: HFEngine, max_batch: int, wait_s: float):
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.requests: "queue.Queue[Job]" = queue.Queue()
        self.counters = {"completions": 0, "batches": 0, "rejected": 0, "cancelled": 0, "decode_steps": 0,
                         "failed": 0}
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, job: Job) -> Job:
        self.requests.put(job)
        return job

    def _work(self) -> None:
        while True:
            batch = [self.requests.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.requests.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            by_sampling: dict[Sampling, list[Job]] = {}
            for job in batch:
                if job.cancelled.is_set():  # its client left while it waited
                    self.counters["cancelled"] += 1
                    job.future.cancel()
                    continue
                by_sampling.setdefault(job.sampling, []).append(job)
            for sampling, jobs in by_sampling.items():
                try:
                    results = self._generate(jobs, sampling)
                except Exception:  # logged here; each waiting request answers 500 without the details
                    traceback.print_exc(file=sys.stderr)
                    self.counters["failed"] += len(jobs)
                    for job in jobs:
                        job.future.set_exception(RuntimeError("generation failed"))
                    continue
                self.counters["batches"] += 1
                for job, result in zip(jobs, results):
                    if job.cancelled.is_set():
                        self.counters["cancelled"] += 1
                    else:
                        self.counters["completions"] += 1
                    job.future.set_result(result)

    def _generate(self, jobs: list[Job], sampling: Sampling) -> list[Generation]:
        """HFEngine's batched generation, with a stopping criterion that ends a row whose client has
        gone (the whole batch ends once every row has ended) and counts the decoding steps."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        counters = self.counters

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                counters["decode_steps"] += 1
                return torch.tensor([job.cancelled.is_set() for job in jobs], device=input_ids.device)

        return self.engine._generate_batch([job.prompt for job in jobs], sampling, StoppingCriteriaList([Cancelled()]))


def make_handler(batcher: Batcher, model_name: str, default_max_tokens: int, max_model_len: int):
    engine = batcher.engine

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: one line per request would drown the tests' output
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param: Optional[str] = None) -> None:
            kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

        def do_GET(self) -> None:
            path = self.path.rstrip("/")
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "local",
                                                             "max_model_len": max_model_len}]})
            elif path == "/health":
                self._send(200, {"status": "ok", **batcher.counters})
            else:
                self._error(404, "no such route")

        def _client_gone(self) -> bool:
            """The client closed its end (EOF readable on the socket) while we generate for it."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, "no such route")
            try:
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    body = json.loads(self.rfile.read(length) or b"{}")
                except (ValueError, RecursionError):
                    raise BadRequest("the request body is not valid JSON") from None
                sampling, messages = parse_request(body, default_max_tokens, max_model_len)
                try:
                    prompt = engine.prompt_texts([messages])[0]
                except Exception:
                    raise BadRequest("the messages do not fit the model's chat template", "messages") from None
                prompt_tokens = len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
                room = max_model_len - prompt_tokens
                if room < 1:
                    raise BadRequest(f"the prompt has {prompt_tokens} tokens; the server's context length is "
                                     f"{max_model_len}", "messages")
                if sampling.max_new_tokens > room:
                    if "max_tokens" in body or "max_completion_tokens" in body:
                        raise BadRequest(f"the context length is {max_model_len} tokens: the prompt has {prompt_tokens} "
                                         f"and max_tokens asks for {sampling.max_new_tokens}", "max_tokens")
                    sampling = Sampling(room, sampling.temperature, sampling.top_p, sampling.seed)
            except BadRequest as exc:
                batcher.counters["rejected"] += 1
                return self._error(400, str(exc), exc.param)
            job = batcher.submit(Job(messages, prompt, sampling))
            while True:
                try:
                    result = job.future.result(timeout=0.05)
                    break
                except TimeoutError:
                    if not job.cancelled.is_set() and self._client_gone():
                        job.cancelled.set()  # the worker stops this row at its next decoding step
                except Exception:
                    if job.cancelled.is_set():
                        self.close_connection = True
                        return
                    return self._error(500, "internal server error")
            if job.cancelled.is_set():
                self.close_connection = True
                return
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": result.completion_tokens,
                          "total_tokens": prompt_tokens + result.completion_tokens},
            })

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog (socketserver's default of 5 resets a burst of clients)


def build_server(model_path: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16,
                 batch_wait_ms: float = 10.0, default_max_tokens: int = 256, name: Optional[str] = None,
                 dtype: str = "float32", max_model_len: Optional[int] = None) -> ThreadingHTTPServer:
    from recipes.config import ModelConfig
    from recipes.models import load_causal_lm, load_tokenizer

    model_cfg = ModelConfig(path=model_path, dtype=dtype)
    model = load_causal_lm(model_cfg, device_map=gpu_device_map())
    context = getattr(model.config, "max_position_embeddings", None) or 4096
    max_model_len = max_model_len or context
    if max_model_len > context:
        raise UserError(f"--max-model-len {max_model_len} exceeds the model's context ({context} tokens)")
    engine = HFEngine(model, load_tokenizer(model_cfg), batch_size=max_batch)
    batcher = Batcher(engine, max_batch, batch_wait_ms / 1000)
    return Server((host, port), make_handler(batcher, name or model_path, default_max_tokens, max_model_len))


@cli_main
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model directory or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port")
    parser.add_argument("--name", help="model name to serve under (default: --model)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="default when a request sets none (cut to the room the prompt leaves)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length: prompt + max_tokens must fit (default: the model's max_position_embeddings)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    for flag in ("max_batch", "max_tokens", "max_model_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    return serve(lambda: build_server(args.model, args.host, args.port, args.max_batch, args.batch_wait_ms,
                                      args.max_tokens, args.name, args.dtype, args.max_model_len),
                 args, what="", path="/v1")


def serve(build, args, what: str, path: str) -> int:
    """Build the server (a port in use is a one-line error), say where it listens, serve until stopped.
    eval.serve_rm serves reward models through this too."""
    try:
        server = build()
    except OSError as exc:
        raise UserError(f"cannot serve {args.model} on {args.host}:{args.port}: {exc}") from None
    host, port = server.server_address[:2]
    print(f"serving {what}{args.name or args.model} on http://{host}:{port}{path}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
