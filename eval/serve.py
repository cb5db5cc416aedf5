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

Limits (eval.serve_rm has the same, docs/reliability.md): a body over --max-body-bytes (default 4 MiB)
gets 413 before any of it is read; a POST without a Content-Length 411; a Content-Length that is not a
non-negative integer 400; more than --max-messages messages (default 1024) or more content than
--max-chars characters 400 before anything is tokenized (default here: the context length times the
longest token of the vocabulary, so a prompt refused this way could never fit). A client that takes
longer than --client-timeout seconds (default 60) to send its request is disconnected. The listen
backlog is 256. Every 4xx/5xx, including http.server's own (a malformed request line, an unsupported
method), is a JSON error body without internals. Request threads tokenize with their own copy of the
tokenizer (under a lock): a fast tokenizer's padding state is shared by every caller, and the batching
worker pads with the original.

Endpoints: GET /v1/models, POST /v1/chat/completions (n=1, no streaming), GET /health (counters:
completions, batches, rejected, cancelled, decode_steps).
With --port 0 a free port is chosen; the first stdout line says where it listens.
"""
from __future__ import annotations

import argparse
import copy
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
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from hs3.io import UserError, cli_main

from eval.engines import Generation, HFEngine, Sampling, gpu_device_map

INT64 = (-(1 << 63), (1 << 63) - 1)
ROLES = ("system", "user", "assistant")
MAX_BODY_BYTES = 4 << 20  # --max-body-bytes
MAX_MESSAGES = 1024  # --max-messages
CLIENT_TIMEOUT_S = 60.0  # --client-timeout: seconds a client may take to send its request


@dataclass(frozen=True)
class Limits:
    """What one request may hold (both servers). max_chars: content characters of all its messages."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_messages: int = MAX_MESSAGES
    max_chars: int = 1 << 20


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


def parse_messages(body, limits: Limits) -> list[dict]:
    """The request's messages as [{role, content}], or BadRequest: a JSON object with a non-empty list of
    messages, each with a known role and text content, within the limits' counts."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"{len(messages)} messages; this server accepts at most {limits.max_messages} (--max-messages)",
                         "messages")
    clean, chars = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        clean.append({"role": m["role"], "content": _content(m, i)})
        chars += len(clean[-1]["content"])
    if chars > limits.max_chars:
        raise BadRequest(f"the messages hold {chars} characters; this server accepts at most {limits.max_chars} "
                         "(--max-chars)", "messages")
    return clean


def parse_request(body, default_max_tokens: int, max_model_len: int, limits: Limits = Limits()) -> tuple[Sampling, list]:
    """The request's sampling and messages, or BadRequest. max_tokens is checked against the context
    later, once the prompt's length is known (check_length)."""
    clean = parse_messages(body, limits)
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
            # Requests that differ only in their seed share a batch: each row samples with its own seed.
            by_sampling: dict[Sampling, list[Job]] = {}
            for job in batch:
                if job.cancelled.is_set():  # its client left while it waited
                    self.counters["cancelled"] += 1
                    job.future.cancel()
                    continue
                by_sampling.setdefault(replace(job.sampling, seed=0), []).append(job)
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

        return self.engine._generate_batch([job.prompt for job in jobs], sampling, StoppingCriteriaList([Cancelled()]),
                                           seeds=[job.sampling.seed for job in jobs])


class HTTPFail(Exception):
    """An answer other than 200 before the request is parsed: status and message (JSON body)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client stopped sending (its request is incomplete) or left: nothing to answer."""


class JSONHandler(BaseHTTPRequestHandler):
    """What both servers share: JSON replies, every error (http.server's own too) as a JSON body without
    internals, and a request body read only within the limits (Limits, set by the server)."""

    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT_S  # socket timeout: a client slower than this to send its request is dropped
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40-200 ms wait between them
    limits = Limits()

    def log_message(self, *args) -> None:  # quiet: one line per request would drown the tests' output
        pass

    def _send(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None) -> None:
        kind = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError", 411: "LengthRequiredError",
                413: "RequestTooLargeError"}.get(status, "BadRequestError" if status < 500 else "InternalServerError")
        self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": status}}, headers)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own errors (a malformed request line or header, an unsupported method) as JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with a status line anyway
            self.request_version = "HTTP/1.1"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        try:
            self._error(code, message or phrase)
        except OSError:
            pass

    def finish(self) -> None:
        """Before a connection is closed with request bytes still unread (a rejected request's headers or
        body), read what has arrived: closing over unread data sends a reset, which can destroy the
        answer before the client reads it."""
        super().finish()
        if self.close_connection:
            try:
                self.connection.setblocking(False)
                for _ in range(16):
                    if not self.connection.recv(65536):
                        break
            except OSError:
                pass

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._error(405, f"method {self.command} is not allowed here", headers={"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def read_json(self):
        """The request body parsed as JSON, or HTTPFail (a missing, malformed or over-limit Content-Length:
        the connection is closed after the answer, its body unread) / ClientGone."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HTTPFail(411, "a Content-Length is required (chunked bodies are not accepted)")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self.close_connection = True
            raise HTTPFail(411, "a Content-Length header is required")
        if len(set(values)) > 1 or not values[0].strip().isdigit():
            self.close_connection = True
            raise HTTPFail(400, "Content-Length must be one non-negative integer")
        length = int(values[0])
        if length > self.limits.max_body_bytes:
            self.close_connection = True
            raise HTTPFail(413, f"the body has {length} bytes; this server accepts at most {self.limits.max_body_bytes} "
                                "(--max-body-bytes)")
        try:
            data = self.rfile.read(length) if length else b""
        except OSError:  # the socket timeout: the client sent less than it announced
            raise ClientGone() from None
        if len(data) < length:
            raise ClientGone()
        try:
            return json.loads(data or b"{}")
        except (ValueError, RecursionError):
            raise BadRequest("the request body is not valid JSON") from None

    def answer(self, handle) -> None:
        """Run handle() (which sends the answer); turn what it raises into the matching JSON error. A server
        fault is logged here (stderr) and answered 500 without details."""
        try:
            handle()
        except HTTPFail as exc:
            self._error(exc.status, str(exc))
        except BadRequest as exc:
            self.on_rejected()
            self._error(400, str(exc), exc.param)
        except ClientGone:
            self.close_connection = True
        except OSError:  # the client left while we answered
            self.close_connection = True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            try:
                self._error(500, "internal server error")
            except OSError:
                pass

    def on_rejected(self) -> None:
        """Count a 400 (eval.serve's /health)."""


def vocabulary_max_chars(tokenizer, max_model_len: int) -> int:
    """Content characters beyond which a prompt cannot fit max_model_len tokens: no token covers more
    characters than the longest entry of the vocabulary (byte-level tokens: a character at least per
    byte), so more than context x that many characters is more than context tokens."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_model_len * max(longest, 1)


def make_handler(batcher: Batcher, model_name: str, default_max_tokens: int, max_model_len: int,
                 limits: Optional[Limits] = None, client_timeout: float = CLIENT_TIMEOUT_S):
    engine = batcher.engine
    # The request threads' own tokenizer: the worker pads batches with engine.tokenizer, and a fast
    # tokenizer's padding/truncation state is one object for every caller (a thread that encodes without
    # padding while the worker pads broke the worker's batch: "expected sequence of length 29 (got 27)").
    front = copy.copy(engine)
    front.tokenizer = copy.deepcopy(engine.tokenizer)
    front_lock = threading.Lock()
    limits = limits or Limits(max_chars=vocabulary_max_chars(front.tokenizer, max_model_len))

    class Handler(JSONHandler):
        timeout = client_timeout

        def on_rejected(self) -> None:
            batcher.counters["rejected"] += 1

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
            self.answer(self._chat)

        def _chat(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self.close_connection = True  # its body stays unread
                return self._error(404, "no such route")
            body = self.read_json()
            sampling, messages = parse_request(body, default_max_tokens, max_model_len, Handler.limits)
            with front_lock:
                try:
                    prompt = front.prompt_texts([messages])[0]
                except Exception:
                    raise BadRequest("the messages do not fit the model's chat template", "messages") from None
                prompt_tokens = len(front.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            room = max_model_len - prompt_tokens
            if room < 1:
                raise BadRequest(f"the prompt has {prompt_tokens} tokens; the server's context length is "
                                 f"{max_model_len}", "messages")
            if sampling.max_new_tokens > room:
                if "max_tokens" in body or "max_completion_tokens" in body:
                    raise BadRequest(f"the context length is {max_model_len} tokens: the prompt has {prompt_tokens} "
                                     f"and max_tokens asks for {sampling.max_new_tokens}", "max_tokens")
                sampling = Sampling(room, sampling.temperature, sampling.top_p, sampling.seed)
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
                        raise ClientGone() from None
                    return self._error(500, "internal server error")
            if job.cancelled.is_set():
                raise ClientGone()
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": result.completion_tokens,
                          "total_tokens": prompt_tokens + result.completion_tokens},
            })

    Handler.limits = limits
    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog (socketserver's default of 5 resets a burst of clients)

    def handle_error(self, request, client_address) -> None:
        """A client that left mid-answer is one line on stderr; anything else is a server fault (traceback)."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            print(f"client {client_address[0]}:{client_address[1]} left: {error}", file=sys.stderr)
        else:
            super().handle_error(request, client_address)


def build_server(model_path: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16,
                 batch_wait_ms: float = 10.0, default_max_tokens: int = 256, name: Optional[str] = None,
                 dtype: str = "float32", max_model_len: Optional[int] = None, max_body_bytes: int = MAX_BODY_BYTES,
                 max_messages: int = MAX_MESSAGES, max_chars: Optional[int] = None,
                 client_timeout: float = CLIENT_TIMEOUT_S) -> ThreadingHTTPServer:
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
    limits = Limits(max_body_bytes, max_messages, max_chars or vocabulary_max_chars(engine.tokenizer, max_model_len))
    return Server((host, port), make_handler(batcher, name or model_path, default_max_tokens, max_model_len, limits,
                                             client_timeout))


def add_limit_flags(parser: argparse.ArgumentParser, max_chars_default: str) -> None:
    """--max-body-bytes, --max-messages, --max-chars, --client-timeout (both servers)."""
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"larger request bodies get 413 unread (default {MAX_BODY_BYTES})")
    parser.add_argument("--max-messages", type=int, default=MAX_MESSAGES,
                        help=f"messages per request (default {MAX_MESSAGES})")
    parser.add_argument("--max-chars", type=int, default=None,
                        help=f"content characters per request, checked before tokenizing (default {max_chars_default})")
    parser.add_argument("--client-timeout", type=float, default=CLIENT_TIMEOUT_S,
                        help=f"seconds a client may take to send its request (default {CLIENT_TIMEOUT_S:g})")


def check_limit_flags(args) -> None:
    for flag in ("max_body_bytes", "max_messages", "max_chars", "client_timeout"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0")


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
    add_limit_flags(parser, "the context length x the vocabulary's longest token")
    args = parser.parse_args(argv)
    for flag in ("max_batch", "max_tokens", "max_model_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    check_limit_flags(args)
    return serve(lambda: build_server(args.model, args.host, args.port, args.max_batch, args.batch_wait_ms,
                                      args.max_tokens, args.name, args.dtype, args.max_model_len, args.max_body_bytes,
                                      args.max_messages, args.max_chars, args.client_timeout),
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
