"""eval.serve under hostile and careless clients, against a real server process on 127.0.0.1.

Malformed requests sent together with valid ones get their own 400 with a JSON error body (vLLM's
shape: {"error": {"message", "type", "param", "code"}}), and every valid one still gets its 200; no
answer carries exception text or server paths; max_tokens is capped by the context; a client that
disconnects cancels its generation (checked by the server's own counters, not by wall time).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(300)

VALID = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 3,
         "temperature": 0}


def _with(**changes) -> dict:
    return {**VALID, **changes}


# (name, body or raw bytes, the parameter the error must name or None)
MALFORMED = [
    ("content int", _with(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ("content missing", _with(messages=[{"role": "user"}]), "messages[0].content"),
    ("content dict", _with(messages=[{"role": "user", "content": {"a": 1}}]), "messages[0].content"),
    ("role bogus", _with(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("message not object", _with(messages=["hi"]), "messages[0]"),
    ("messages empty", _with(messages=[]), "messages"),
    ("messages string", _with(messages="hi"), "messages"),
    ("no messages", {"model": "tiny"}, "messages"),
    ("max_tokens 0", _with(max_tokens=0), "max_tokens"),
    ("max_tokens negative", _with(max_tokens=-5), "max_tokens"),
    ("max_tokens huge", _with(max_tokens=10**9), "max_tokens"),
    ("max_tokens string", _with(max_tokens="12"), "max_tokens"),
    ("max_tokens float", _with(max_tokens=2.5), "max_tokens"),
    ("temperature negative", _with(temperature=-1), "temperature"),
    ("temperature string", _with(temperature="hot"), "temperature"),
    ("top_p zero", _with(top_p=0), "top_p"),
    ("top_p above 1", _with(top_p=1.5), "top_p"),
    ("seed huge", _with(seed=10**30), "seed"),
    ("seed float", _with(seed=1.5), "seed"),
    ("n 2", _with(n=2), "n"),
    ("stream", _with(stream=True), "stream"),
    ("body a list", [1, 2, 3], None),
    ("not json", b"{not json", None),
    ("deep json", b"[" * 100000 + b"]" * 100000, None),
]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The freshly initialised tiny model repeats one token and never ends a turn by itself: its
    generations run to max_tokens, so a long one is really long."""
    proc = subprocess.Popen([sys.executable, "-m", "eval.serve", "--model", str(tiny_model_dir), "--port", "0",
                             "--name", "tiny", "--max-batch", "16", "--batch-wait-ms", "100"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), f"server did not start: {line!r} {proc.stderr.read()[-2000:]}"
        yield line.split()[-1].removesuffix("/v1")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post(base: str, body, timeout: float = 120) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health") as r:
        return json.load(r)


def assert_clean_error(status: int, body: dict, param) -> None:
    assert status == 400, body
    error = body["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError" and error["message"]
    if param is not None:
        assert error["param"] == param, error
    text = json.dumps(body)
    for leak in ("Traceback", "File \"", str(REPO_ROOT), "site-packages", "Error:", "Exception"):
        assert leak not in text, f"{leak!r} leaked to the client: {text}"


def test_malformed_requests_batched_with_valid_ones_fail_alone(server):
    results: dict[str, tuple[int, dict]] = {}
    jobs = [(f"valid {i}", _with(messages=[{"role": "user", "content": f"Question {i}"}]), None) for i in range(10)]
    jobs += MALFORMED
    barrier = threading.Barrier(len(jobs))

    def send(name, body):
        barrier.wait()
        results[name] = post(server, body)

    threads = [threading.Thread(target=send, args=(name, body)) for name, body, _ in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    for name, body, param in jobs:
        status, answer = results[name]
        if name.startswith("valid"):
            assert status == 200, (name, answer)
            assert answer["choices"][0]["finish_reason"] == "length"
            assert answer["usage"]["completion_tokens"] == 3 and answer["usage"]["prompt_tokens"] > 0
        else:
            assert_clean_error(status, answer, param)
    assert health(server)["failed"] == 0


def test_max_tokens_within_the_context_and_the_prompt_counts(server):
    with urllib.request.urlopen(server + "/v1/models") as r:
        context = json.load(r)["data"][0]["max_model_len"]
    assert context == 2048  # conf/model/tiny.yaml max_position_embeddings
    status, body = post(server, _with(max_tokens=context))  # the prompt leaves less room than that
    assert_clean_error(status, body, "max_tokens")
    assert "context length is 2048" in body["error"]["message"]
    status, body = post(server, _with(max_tokens=1, seed=2**63 - 1, temperature=0.7))  # the largest seed works
    assert status == 200 and body["usage"]["completion_tokens"] == 1


def test_a_client_that_disconnects_cancels_its_generation(server):
    host, port = server.removeprefix("http://").split(":")
    before = health(server)
    # A long request (2000 tokens, every one generated: this model never stops by itself) ...
    data = json.dumps(_with(max_tokens=2000)).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    deadline = time.monotonic() + 60
    while health(server)["decode_steps"] - before["decode_steps"] < 20:  # ... is being generated
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sock.close()  # ... and its client leaves
    status, body = post(server, _with(max_tokens=4), timeout=120)
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    after = health(server)
    assert after["cancelled"] - before["cancelled"] == 1
    # The long generation stopped soon after the client left: far fewer steps than its 2000 were run.
    steps = after["decode_steps"] - before["decode_steps"]
    assert steps < 1000, steps
    assert after["completions"] - before["completions"] == 1
