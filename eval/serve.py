"""A small OpenAI-compatible chat-completions server around a transformers model.

    python -m eval.serve --model PATH [--port 8000] [--host 127.0.0.1] [--max-batch 16]

For tests, benchmarks and quick local scoring (`./launch.sh eval model=http://127.0.0.1:8000/v1`);
for a 70B model use vLLM, TRT-LLM or NIM, which speak the same protocol. Concurrent requests are
gathered into batches (up to --max-batch, waiting at most --batch-wait-ms for company) and run
through eval.engines.HFEngine, so this server batches the way the in-process engine does.

Endpoints: GET /v1/models, POST /v1/chat/completions (n=1, no streaming), GET /health (counts).
With --port 0 a free port is chosen; the first stdout line says where it listens.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from recipes.io import UserError, cli_main

from eval.engines import HFEngine, Sampling, gpu_device_map


class Batcher:
    """One worker thread owns the model; request threads hand it work through a queue."""

    def __init__(self, engine: HFEngine, max_batch: int, wait_s: float):
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.requests: "queue.Queue[tuple[list, Sampling, Future]]" = queue.Queue()
        self.completions = 0
        self.batches = 0
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, messages: list, sampling: Sampling) -> Future:
        future: Future = Future()
        self.requests.put((messages, sampling, future))
        return future

    def _work(self) -> None:
        while True:
            batch = [self.requests.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.requests.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            by_sampling: dict[Sampling, list] = {}
            for item in batch:
                by_sampling.setdefault(item[1], []).append(item)
            for sampling, items in by_sampling.items():
                try:
                    results = self.engine.generate([m for m, _, _ in items], sampling)
                except Exception as exc:  # reported to each waiting request as a 500
                    for _, _, future in items:
                        future.set_exception(exc)
                    continue
                self.batches += 1
                self.completions += len(items)
                for (_, _, future), result in zip(items, results):
                    future.set_result(result)


def make_handler(batcher: Batcher, model_name: str, default_max_tokens: int):
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

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"}})

        def do_GET(self) -> None:
            path = self.path.rstrip("/")
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "local"}]})
            elif path == "/health":
                self._send(200, {"status": "ok", "completions": batcher.completions, "batches": batcher.batches})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                sampling, messages = parse_request(body, default_max_tokens)
            except (ValueError, TypeError, KeyError) as exc:
                return self._error(400, str(exc))
            try:
                result = batcher.submit(messages, sampling).result()
            except Exception as exc:
                return self._error(500, f"{type(exc).__name__}: {exc}")
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": {"prompt_tokens": 0, "completion_tokens": result.completion_tokens,
                          "total_tokens": result.completion_tokens},
            })

    return Handler


def parse_request(body: dict, default_max_tokens: int) -> tuple[Sampling, list]:
    messages = body["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
        raise ValueError("messages must be a list of {role, content}")
    if body.get("n", 1) != 1 or body.get("stream"):
        raise ValueError("only n=1 without streaming is supported")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    sampling = Sampling(max_new_tokens=int(max_tokens), temperature=float(body.get("temperature", 1.0)),
                        top_p=float(body.get("top_p", 1.0)), seed=int(body.get("seed") or 0))
    return sampling, [{"role": m["role"], "content": m["content"]} for m in messages]


def build_server(model_path: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16,
                 batch_wait_ms: float = 10.0, default_max_tokens: int = 256, name: Optional[str] = None,
                 dtype: str = "float32") -> ThreadingHTTPServer:
    from recipes.config import ModelConfig
    from recipes.models import load_causal_lm, load_tokenizer

    model_cfg = ModelConfig(path=model_path, dtype=dtype)
    engine = HFEngine(load_causal_lm(model_cfg, device_map=gpu_device_map()), load_tokenizer(model_cfg), batch_size=max_batch)
    batcher = Batcher(engine, max_batch, batch_wait_ms / 1000)
    server = ThreadingHTTPServer((host, port), make_handler(batcher, name or model_path, default_max_tokens))
    server.daemon_threads = True
    return server


@cli_main
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model directory or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port")
    parser.add_argument("--name", help="model name to serve under (default: --model)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=256, help="default when a request sets none")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    try:
        server = build_server(args.model, args.host, args.port, args.max_batch, args.batch_wait_ms, args.max_tokens,
                              args.name, args.dtype)
    except OSError as exc:
        raise UserError(f"cannot serve {args.model} on {args.host}:{args.port}: {exc}") from None
    host, port = server.server_address[:2]
    print(f"serving {args.name or args.model} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
