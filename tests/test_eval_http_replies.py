"""A 200 reply that is not a chat completion (issue 18, item 9): not JSON, an HTML page from a proxy,
`choices: []`, `message: null`. Each is a recorded row failure, retried like a 5xx, never a traceback;
against a real HTTP server on localhost that answers so."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.timeout(300)

GOOD = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "An edited answer."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
CUT = {**GOOD, "choices": [{"index": 0, "message": {"role": "assistant", "content": "An edi"}, "finish_reason": "length"}]}
# keyword in the request -> (content type, body)
REPLIES = {
    "HTML": ("text/html", "<html><body>502 Bad Gateway (proxy)</body></html>"),
    "NOTJSON": ("application/json", "this is not json"),
    "NOCHOICES": ("application/json", json.dumps({**GOOD, "choices": []})),
    "NULLMESSAGE": ("application/json", json.dumps({**GOOD, "choices": [{"index": 0, "message": None,
                                                                          "finish_reason": "stop"}]})),
    "CUT": ("application/json", json.dumps(CUT)),
}


class Server:
    """Chat completions on 127.0.0.1: a reply per keyword in the request (REPLIES), FLAKY answers HTML
    the first time and a completion after, anything else a completion. Counts requests per keyword."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, content_type: str, body: str):
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send("application/json", json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                key = next((k for k in (*REPLIES, "FLAKY") if k in body), "GOOD")
                with lock:
                    server.counts[key] = server.counts.get(key, 0) + 1
                    n = server.counts[key]
                if key == "FLAKY":
                    self._send(*(REPLIES["HTML"] if n == 1 else ("application/json", json.dumps(GOOD))))
                elif key in REPLIES:
                    self._send(*REPLIES[key])
                else:
                    self._send("application/json", json.dumps(GOOD))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _conversation(keyword: str) -> list[dict]:
    return [{"role": "user", "content": f"Tell me something ({keyword})."}, {"role": "assistant", "content": "Something."},
            {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\n<None>"}]


def test_malformed_200_replies_are_retried_then_recorded_row_failures():
    from eval.engines import HTTPEngine, Sampling
    from hs3.io import UserError

    keys = ["GOOD", "HTML", "NOTJSON", "NOCHOICES", "NULLMESSAGE", "FLAKY", "CUT"]
    with Server() as server:
        engine = HTTPEngine(server.url, concurrency=4, max_retries=2, timeout_s=30)
        results = dict(zip(keys, engine.generate([_conversation(k) for k in keys], Sampling(max_new_tokens=8))))
        counts = dict(server.counts)
        with pytest.raises(UserError, match="every request failed after retries .*MalformedReply"):
            engine.generate([_conversation("HTML")], Sampling(max_new_tokens=8))
    assert (results["GOOD"].text, results["GOOD"].finish_reason, results["GOOD"].completion_tokens) == (
        "An edited answer.", "stop", 4)
    assert results["CUT"].finish_reason == "length" and results["CUT"].error is None
    assert results["FLAKY"].error is None and counts["FLAKY"] == 2  # retried once, then answered
    for key, what in (("HTML", "not JSON"), ("NOTJSON", "not JSON"), ("NOCHOICES", "no choices"),
                      ("NULLMESSAGE", "choices[0].message is None")):
        result = results[key]
        assert result.finish_reason == "error" and result.error.startswith("MalformedReply: ") and what in result.error
        assert counts[key] == 3, (key, counts)  # the first try and max_retries=2 retries, as a 5xx gets


def test_the_eval_against_a_proxy_that_answers_html_records_the_rows_and_goes_on(tmp_path):
    from hs3.io import atomic_write_jsonl

    rows = [{"id": f"r{i}", "prompt": _conversation(key), "original_response": "Something.",
             "reference_edit": "Something better.", "domain": "general", "language": "english"}
            for i, key in enumerate(["GOOD", "HTML", "NULLMESSAGE", "GOOD"])]
    atomic_write_jsonl(tmp_path / "data" / "prompts" / "validation.jsonl", rows)
    with Server() as server:
        proc = run_cli("-m", "launcher", "eval", f"model={server.url}", f"data={tmp_path / 'data'}", "rm=null",
                       f"out={tmp_path / 'out'}", "eval.max_retries=1", "eval.bootstrap_samples=20")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [line["error"] is None for line in lines] == [True, False, False, True]
    assert lines[1]["error"].startswith("MalformedReply: not JSON") and lines[1]["finish_reason"] == "error"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["errors"] == 2 and report["overall"]["copy_rate"]["n"] == 2
    assert report["meta"]["provenance"]["model"] == {"path": server.url, "endpoint": True, "served_model": "m",
                                                     "fingerprint": None}
