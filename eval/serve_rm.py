"""Serve a reward model (either kind) over vLLM's Pooling API, for eval.gold_rm=http://... and the ITS loop.

    python -m eval.serve_rm --model DIR [--kind seqcls|first_logit] [--port 8001] [--host 127.0.0.1]

POST /pooling {"model": NAME, "messages": [{role, content}, ...]} -> {"object": "list", "model": NAME,
"data": [{"index": 0, "object": "pooling", "data": [REWARD]}]}, the request and reply shapes of vLLM's
/pooling route (docs.vllm.ai, "Pooling API"); GET /v1/models; GET /health (how many conversations were
scored). The reward is eval.reward_scorers' (seqcls: the classifier's output; first_logit: the logit of
token id 0 at the first generated position, NVIDIA's Nemotron-70B-Select/-Reward convention), so an
endpoint and a local dir give the same number. Requests are scored one at a time under a lock (a reward
forward pass is short next to a generation; put vLLM in front for throughput). With --port 0 a free port
is chosen; the first stdout line says where it listens.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from hs3.io import cli_main

from eval.reward_scorers import KINDS, load_scorer


def make_handler(scorer, name: str):
    lock = threading.Lock()
    counts = {"scored": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
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
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "local"}]})
            elif path == "/health":
                self._send(200, {"status": "ok", "scored": counts["scored"], "kind": scorer.kind})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/pooling":
                return self._error(404, f"no route {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                messages = body["messages"]
                if not isinstance(messages, list) or not all(
                        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in messages):
                    raise ValueError("messages must be a list of {role, content} with string content")
            except (ValueError, TypeError, KeyError) as exc:
                return self._error(400, f"{type(exc).__name__}: {exc}")
            try:
                with lock:
                    reward = scorer.score([[{"role": m["role"], "content": m["content"]} for m in messages]])[0]
                    counts["scored"] += 1
            except Exception as exc:  # reported as a 500: the client retries, then records the row
                return self._error(500, f"{type(exc).__name__}: {exc}")
            self._send(200, {"object": "list", "model": name,
                             "data": [{"index": 0, "object": "pooling", "data": [reward]}]})

    return Handler


def build_server(model: str, kind: Optional[str] = None, host: str = "127.0.0.1", port: int = 0,
                 name: Optional[str] = None, dtype: str = "float32") -> ThreadingHTTPServer:
    scorer = load_scorer(model, kind, dtype=dtype, batch_size=1)
    server = ThreadingHTTPServer((host, port), make_handler(scorer, name or model))
    server.daemon_threads = True
    return server


@cli_main
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.serve_rm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a reward model dir (or builtin:tiny-gold)")
    parser.add_argument("--kind", choices=KINDS, help="default: from the model's config.json architectures")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 = any free port")
    parser.add_argument("--name", help="model name to serve under (default: --model)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    from eval.serve import serve

    return serve(lambda: build_server(args.model, args.kind, args.host, args.port, args.name, args.dtype),
                 args, what="reward model ", path="")


if __name__ == "__main__":
    sys.exit(main())
