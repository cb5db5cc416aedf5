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

A request is checked before it reaches the model, with eval.serve's rules and limits (docs/reliability.md):
a JSON object whose messages are a non-empty list of {role: system|user|assistant, content: text}; at most
--max-messages (1024) messages and --max-chars (1,048,576) content characters; a body over
--max-body-bytes (4 MiB) gets 413 unread. Every error is a JSON body without internals (a scoring failure
is logged here and answered 500 "internal server error"). The listen backlog is 256.
"""
from __future__ import annotations

import argparse
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Optional

from hs3.io import cli_main

from eval.reward_scorers import KINDS, load_scorer
from eval.serve import (CLIENT_TIMEOUT_S, MAX_BODY_BYTES, MAX_MESSAGES, JSONHandler, Limits, Server,
                        add_limit_flags, check_limit_flags, parse_messages, serve)

MAX_CHARS = 1 << 20  # --max-chars: the scorer cuts a long conversation by its truncation rule; this bounds the work


def make_handler(scorer, name: str, limits: Limits = Limits(max_chars=MAX_CHARS), client_timeout: float = CLIENT_TIMEOUT_S):
    lock = threading.Lock()
    counts = {"scored": 0}

    class Handler(JSONHandler):
        timeout = client_timeout

        def do_GET(self) -> None:
            path = self.path.rstrip("/")
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "local"}]})
            elif path == "/health":
                self._send(200, {"status": "ok", "scored": counts["scored"], "kind": scorer.kind})
            else:
                self._error(404, "no such route")

        def do_POST(self) -> None:
            self.answer(self._pooling)

        def _pooling(self) -> None:
            if self.path.rstrip("/") != "/pooling":
                self.close_connection = True  # its body stays unread
                return self._error(404, "no such route")
            messages = parse_messages(self.read_json(), self.limits)
            with lock:  # a scoring failure propagates: answer() logs it and answers 500 without details
                reward = scorer.score([messages])[0]
                counts["scored"] += 1
            self._send(200, {"object": "list", "model": name,
                             "data": [{"index": 0, "object": "pooling", "data": [reward]}]})

    Handler.limits = limits
    return Handler


def build_server(model: str, kind: Optional[str] = None, host: str = "127.0.0.1", port: int = 0,
                 name: Optional[str] = None, dtype: str = "float32", max_body_bytes: int = MAX_BODY_BYTES,
                 max_messages: int = MAX_MESSAGES, max_chars: Optional[int] = None,
                 client_timeout: float = CLIENT_TIMEOUT_S) -> ThreadingHTTPServer:
    scorer = load_scorer(model, kind, dtype=dtype, batch_size=1)
    limits = Limits(max_body_bytes, max_messages, max_chars or MAX_CHARS)
    return Server((host, port), make_handler(scorer, name or model, limits, client_timeout))


@cli_main
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.serve_rm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a reward model dir (or builtin:tiny-gold)")
    parser.add_argument("--kind", choices=KINDS, help="default: from the model's config.json architectures")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 = any free port")
    parser.add_argument("--name", help="model name to serve under (default: --model)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    add_limit_flags(parser, str(MAX_CHARS))
    args = parser.parse_args(argv)
    check_limit_flags(args)
    return serve(lambda: build_server(args.model, args.kind, args.host, args.port, args.name, args.dtype,
                                      args.max_body_bytes, args.max_messages, args.max_chars, args.client_timeout),
                 args, what="reward model ", path="")


if __name__ == "__main__":
    sys.exit(main())
