"""The Feedback-Edit inference-time-scaling loop (its/): feedback filtering, both reward-model kinds,
selection, resume after a crash, a failing endpoint, endpoints served by `python -m eval.serve` /
`eval.serve_rm` on 127.0.0.1, and its-eval's judge against eval.serve. Tiny models: the numbers mean
nothing; the tests check what is asked, what is kept and what is chosen."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_cli

PROMPTS = [
    {"id": "p0", "prompt": "What is the capital of France?"},
    {"id": "p1", "messages": [{"role": "user", "content": "Write a haiku about rain."}]},
    {"id": "p2", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "Sort [3, 1, 2] in Python."}]},
]
BAD_ROWS = ['{"id": "x1", "messages": [{"role": "assistant", "content": "no user turn"}]}', 'not json']
SMALL = ["its.max_new_tokens=8", "its.feedback_max_new_tokens=8", "its.batch_size=8"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("its_prompts") / "prompts.jsonl"
    path.write_text("\n".join([json.dumps(p) for p in PROMPTS] + BAD_ROWS) + "\n")
    return path


def _serve(module: str, model: Path, *extra: str):
    proc = subprocess.Popen([sys.executable, "-m", module, "--model", str(model), "--port", "0", *extra],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        raise AssertionError(f"{module} did not start: {line!r}")
    return proc, line.split()[-1]


@pytest.fixture(scope="module")
def gen_server(varied_model_dir):
    """eval.serve on 127.0.0.1; --max-model-len 1024 makes it refuse (400) a long prompt's request."""
    proc, url = _serve("eval.serve", varied_model_dir, "--name", "tiny", "--max-batch", "8", "--max-model-len", "1024")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def rm_server(tiny_rm_dir):
    proc, url = _serve("eval.serve_rm", tiny_rm_dir, "--name", "rm")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as r:
        return json.load(r)


def _run(tmp_path, args):
    from its.loop import run
    from recipes.config import compose

    cfg = compose("its", [f"out={tmp_path}", *SMALL, *args])
    return cfg, run(cfg)


def _results(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]


# ---- feedback filtering --------------------------------------------------------------------------

FEEDBACK = ["The response is perfectly helpful. However it could improve nothing.",
            "The response is mostly helpful.",
            "The response is partially helpful but lacks detail; it could improve. However, fine.",
            "The response is slightly helpful but wrong.",
            "",
            "The response is not helpful. It would benefit from an example, but lacks one."]


def test_feedback_pick_drops_perfectly_helpful_and_picks_by_keywords_or_seeded_random():
    from data_prep.feedback import select_feedback
    from its.feedback import pick_sets

    usable = [f for f in FEEDBACK if f and not f.startswith("The response is perfectly")]
    # keywords: the seed's rerank (stable sort by keyword count, perfectly-helpful skipped, first 3)
    [kw] = pick_sets(FEEDBACK, "keywords", 3, 1, "s")
    assert kw == select_feedback(FEEDBACK) == [FEEDBACK[2], FEEDBACK[5], FEEDBACK[3]]
    # random: 3 of the usable ones, the same for the same seed, other seeds give other draws
    draws = {tuple(map(tuple, pick_sets(FEEDBACK, "random", 3, 2, f"1234/p{i}/0"))) for i in range(20)}
    assert len(draws) > 1
    for sets in draws:
        assert len(sets) == 2 and all(len(s) == 3 and len(set(s)) == 3 and set(s) <= set(usable) for s in sets)
    assert pick_sets(FEEDBACK, "random", 3, 2, "1234/p0/0") == pick_sets(FEEDBACK, "random", 3, 2, "1234/p0/0")
    assert pick_sets(FEEDBACK, "random", 2, 1, "x")[0][0] in usable and len(pick_sets(FEEDBACK, "random", 2, 1, "x")[0]) == 2
    # nothing to edit by: no set; fewer usable than max_kept: all of them
    assert pick_sets([FEEDBACK[0], ""], "random", 3, 1, "s") == [] == pick_sets([FEEDBACK[0]], "keywords", 3, 1, "s")
    assert sorted(pick_sets(FEEDBACK[:2], "random", 3, 1, "s")[0]) == [FEEDBACK[1]]


def test_selection_takes_the_best_score_first_wins_ties_and_skips_unscored():
    from its.loop import choose

    cands = [{"index": 0, "text": "r0", "score": 1.0, "kept_feedback": [["f"]],
              "edits": [{"set": 0, "sample": 0, "text": "e00", "score": 2.0},
                        {"set": 0, "sample": 1, "text": "e01", "score": 2.0}]},
             {"index": 1, "text": "r1", "score": 2.0, "kept_feedback": [], "edits": []},
             {"index": 2, "text": "", "error": "boom"}]
    final = choose(cands)
    assert final == {"text": "e00", "score": 2.0, "source": "edit", "response": 0, "set": 0, "sample": 0,
                     "kept_feedback": ["f"]}
    cands[0]["edits"][0]["score"] = None  # unscored (its endpoint failed): never chosen
    assert choose(cands)["text"] == "e01"
    cands[1]["score"] = 5.0
    assert choose(cands) == {"text": "r1", "score": 5.0, "source": "response", "response": 1}
    assert choose([{"index": 0, "text": "x", "score": None, "edits": []}]) is None


def test_config_errors_are_one_line(tmp_path, prompts_file):
    for args, message in ((["its.feedback_pick=best"], "its.feedback_pick=best"),
                          (["its.feedback_pick=keywords", "its.feedback_sets=2"], "its.feedback_sets=2"),
                          (["its.responses=0"], "its.responses=0")):
        proc = run_cli("-m", "launcher", "its", f"prompts={prompts_file}", *args, f"out={tmp_path}")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_cli("-m", "launcher", "its", f"prompts={prompts_file}", "policy=http://127.0.0.1:9/v1", f"out={tmp_path}")
    assert proc.returncode == 2 and "select_model=M" in proc.stderr and "Traceback" not in proc.stderr
    # an endpoint that is down: one line naming it, exit 2, before any prompt is asked
    dead = "http://127.0.0.1:9/v1"
    proc = run_cli("-m", "launcher", "its", f"prompts={prompts_file}", f"policy={dead}", f"feedback_model={dead}",
                   f"edit_model={dead}", f"select_model={dead}", "its.max_retries=0", f"out={tmp_path}")
    assert proc.returncode == 2 and "127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---- the loop with local dirs: both reward-model kinds ---------------------------------------------

@pytest.mark.parametrize("select", ["first_logit", "seqcls"])
def test_local_loop_asks_in_the_seed_formats_and_selects_the_best(select, tmp_path, varied_model_dir, tiny_model_dir,
                                                                  tiny_rm_dir, prompts_file):
    from data_prep import build_edit_conversation
    from data_prep.feedback_prompt import FEEDBACK_INSTRUCTION, build_feedback_request
    from eval.reward_scorers import load_scorer
    from its.loop import samplings
    from its.models import Generator

    select_dir = tiny_model_dir if select == "first_logit" else tiny_rm_dir
    cfg, result = _run(tmp_path, [f"prompts={prompts_file}", f"policy={varied_model_dir}", f"feedback_model={varied_model_dir}",
                                  f"edit_model={varied_model_dir}", f"select_model={select_dir}", "its.responses=2",
                                  "its.feedbacks=3", "its.feedback_sets=2", "its.edits=2", "its.feedback_temperature=1.0"])
    records = _results(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["id"] for r in records] == ["p0", "p1", "p2"] and summary["rejected_prompts"] == 2
    assert len((tmp_path / "rejected.jsonl").read_text().splitlines()) == 2
    assert summary["models"]["select_model"]["kind"] == select
    scorer = load_scorer(str(select_dir))
    sampling = samplings(cfg)
    edit_cache = Generator(None, None, None, tmp_path / "cache" / "edit_model.jsonl", 1).cache
    feedback_cache = Generator(None, None, None, tmp_path / "cache" / "feedback_model.jsonl", 1).cache
    for r in records:
        assert len(r["candidates"]) == 2
        every = []
        for c in r["candidates"]:
            assert len(c["feedback"]) == 3
            for f, item in enumerate(c["feedback"]):  # asked as the Feedback model was trained
                request = build_feedback_request(r["prompt"], c["text"])
                assert request[-1]["content"] == FEEDBACK_INSTRUCTION
                keys = [k for k, g in feedback_cache.entries.items() if g.text == item["text"]]
                assert any(k == Generator.request_key(k_id, request, sampling["feedback_model"], f)
                           for k in keys for k_id in _model_ids(tmp_path, "feedback_model"))
            assert len(c["edits"]) == 2 * len(c["kept_feedback"])
            for e in c["edits"]:  # asked in the seed's edit-request format, byte for byte
                conversation = build_edit_conversation(r["prompt"], c["text"], c["kept_feedback"][e["set"]])
                key = Generator.request_key(_model_ids(tmp_path, "edit_model")[0], conversation,
                                            sampling["edit_model"], e["sample"])
                assert edit_cache.entries[key].text == e["text"]
            every += [c, *c["edits"]]
        # every candidate scored by the select model as [context..., assistant: text]
        expected = scorer.score([r["prompt"] + [{"role": "assistant", "content": x["text"]}] for x in every])
        assert [x["score"] for x in every] == pytest.approx(expected, abs=1e-5)
        assert r["final"]["score"] == pytest.approx(max(expected), abs=1e-5)
        assert r["final"]["text"] in [x["text"] for x in every]
    assert summary["score"]["prompts_scored"] == 3 and summary["failed_requests"] == 0
    assert summary["models"]["policy"]["calls"] == 6 and summary["models"]["feedback_model"]["calls"] == 18
    assert "mean nothing" in summary["notes"][0] and (tmp_path / "score_lift.png").stat().st_size > 0
    assert result["metric"] == "score_lift" and (tmp_path / "config.yaml").is_file()


def _model_ids(out: Path, role: str) -> list[str]:
    from eval.engines import dir_fingerprint

    spec = json.loads((out / "summary.json").read_text())["models"][role]["model"]
    return [f"{spec}@{dir_fingerprint(spec)}"]


# ---- resume after a crash ------------------------------------------------------------------------

def test_a_crash_resumes_from_finished_prompts_and_cached_calls(tmp_path, varied_model_dir, tiny_model_dir, prompts_file,
                                                               monkeypatch):
    from its import models as its_models

    args = [f"prompts={prompts_file}", f"policy={varied_model_dir}", f"feedback_model={varied_model_dir}",
            f"edit_model={varied_model_dir}", f"select_model={tiny_model_dir}", "its.chunk_prompts=2", "its.feedbacks=2"]
    real = its_models.Generator.generate
    edit_calls = []

    def crash_on_second_edit_step(self, requests, sampling):
        if self.role == "edit_model":
            edit_calls.append(len(requests))
            if len(edit_calls) == 2:
                raise RuntimeError("killed")
        return real(self, requests, sampling)

    monkeypatch.setattr(its_models.Generator, "generate", crash_on_second_edit_step)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, args)
    assert not (tmp_path / "summary.json").exists()
    progress = [json.loads(line)["record"]["id"] for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert progress == ["p0", "p1"]
    monkeypatch.setattr(its_models.Generator, "generate", real)
    _run(tmp_path, args)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_prompts"] == 2
    # p2's response and feedback were generated before the crash: read back, not asked again
    assert summary["models"]["policy"]["calls"] == 0 and summary["models"]["policy"]["cached"] == 1
    assert summary["models"]["feedback_model"]["calls"] == 0 and summary["models"]["feedback_model"]["cached"] == 2
    assert summary["models"]["edit_model"]["calls"] >= 1
    # the same records as a run that never crashed
    fresh = tmp_path / "fresh"
    _run(fresh, args)
    assert _results(tmp_path) == _results(fresh)


# ---- endpoints -----------------------------------------------------------------------------------

def test_endpoints_a_failing_request_is_recorded_and_its_eval_judges_both_orders(tmp_path, gen_server, rm_server,
                                                                                 prompts_file, tiny_rm_dir):
    long_prompt = {"id": "long", "prompt": "tell me more " * 400}  # over the server's --max-model-len: a 400
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(prompts_file.read_text() + json.dumps(long_prompt) + "\n")
    out = tmp_path / "run"
    before = _health(gen_server)["completions"]
    proc = run_cli("-m", "launcher", "its", f"prompts={prompts}", f"policy={gen_server}", f"feedback_model={gen_server}",
                   f"edit_model={gen_server}", f"select_model={rm_server}", "its.responses=2", "its.feedbacks=2",
                   "its.edits=1", "its.concurrency=4", "its.max_retries=1", *SMALL, f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["id"]: r for r in _results(out)}
    summary = json.loads((out / "summary.json").read_text())
    # the refused request: retried by the client, then recorded in the prompt's record; the run went on
    assert all("BadRequestError" in c["error"] for c in records["long"]["candidates"]) and records["long"]["final"] is None
    assert summary["models"]["policy"]["errors"] == 2 and summary["no_final"] == 1  # 2 samples (seed, seed + 1)
    assert all(records[p]["final"] is not None for p in ("p0", "p1", "p2"))
    policy, feedback, edit = (summary["models"][r]["calls"] for r in ("policy", "feedback_model", "edit_model"))
    assert _health(gen_server)["completions"] - before == policy - 2 + feedback + edit
    assert summary["models"]["select_model"]["kind"] == "endpoint"
    from eval.reward_scorers import load_scorer
    local = load_scorer(str(tiny_rm_dir))
    r = records["p2"]
    assert r["candidates"][0]["score"] == pytest.approx(
        local.score([r["prompt"] + [{"role": "assistant", "content": r["candidates"][0]["text"]}]])[0], abs=1e-4)
    assert "[its]" in proc.stdout and "lift" in proc.stdout

    # its-eval: the finals vs the policy's first answers, judged by eval.serve in both orders
    before = _health(gen_server)["completions"]
    proc = run_cli("-m", "launcher", "its-eval", str(out), f"{out}:first", f"judge={gen_server}", "max_new_tokens=8",
                   "samples=200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "its-eval" / "run-vs-run-first" / "its_eval.json").read_text())
    differing = sum(records[p]["final"]["text"] != records[p]["candidates"][0]["text"] for p in ("p0", "p1", "p2"))
    assert report["prompts_compared"] == 3 and report["missing_text"] == 1 and report["identical"] == 3 - differing
    assert report["judge_requests"] == 2 * differing == _health(gen_server)["completions"] - before
    # a tiny random judge writes no verdict label: those orders are counted, not guessed
    assert report["judge_unparsed"] == 2 * differing
    assert report["win_rate_a"]["n"] == 3 - differing if differing < 3 else report["win_rate_a"] is None
    proc = run_cli("-m", "launcher", "its-eval", str(out), "judge=http://127.0.0.1:9/v1")
    assert proc.returncode == 2 and "usage: its-eval" in proc.stderr


def test_win_rate_counts_both_orders_and_has_a_bootstrap_ci():
    from eval.metrics import summarize
    from its.evaluate import game_scores, judge_messages, parse_verdict

    assert parse_verdict("Mine first... [[B>A]] hmm, no: My final verdict is [[A>>B]].") == "A>>B"
    assert parse_verdict("A is better") is None
    # A first says A>B; B first says B>A (A shown second won again): A wins both orders
    assert game_scores("A>B", "B>A") == [1.0, 1.0]
    assert game_scores("A>B", "A>B") == [1.0, 0.0]  # position bias: the first shown always wins -> 0.5 overall
    assert game_scores("A=B", None) == [0.5]
    per_prompt = [sum(s) / len(s) for s in ([1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0])]
    win = summarize(per_prompt, samples=500, seed=0)
    assert win["value"] == 0.625 and win["ci"][0] < 0.625 < win["ci"][1] and win["n"] == 4
    messages = judge_messages([{"role": "user", "content": "Q?"}], "ans A", "ans B")
    assert messages[0]["role"] == "system" and "[[A>>B]]" in messages[0]["content"]
    assert "<|User Prompt|>\nQ?" in messages[1]["content"] and messages[1]["content"].index("ans A") < messages[1]["content"].index("ans B")


# ---- a flaky endpoint: retried, then recorded ----------------------------------------------------

@pytest.fixture()
def flaky_proxy(gen_server):
    """A real HTTP proxy in front of eval.serve that answers 503 to the first 2 chat requests and to
    every chat request about a haiku (the openai client retries 503s)."""
    import threading
    import urllib.error
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = {"failed": 0, "haiku": 0, "forwarded": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _forward(self, body: bytes | None):
            request = urllib.request.Request(gen_server.removesuffix("/v1") + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request) as reply:
                    status, data = reply.status, reply.read()
            except urllib.error.HTTPError as exc:
                status, data = exc.code, exc.read()
            self._send(status, data)

        def _send(self, status: int, data: bytes):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._forward(None)

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                fail = seen["failed"] < 2 or b"haiku" in body
                seen["haiku"] += b"haiku" in body
                seen["failed"] += fail
                seen["forwarded"] += not fail
            if fail:
                return self._send(503, b'{"error": {"message": "overloaded", "type": "server_error"}}')
            self._forward(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_a_flaky_endpoint_is_retried_and_a_request_that_keeps_failing_is_recorded(tmp_path, flaky_proxy, gen_server,
                                                                                   tiny_model_dir, prompts_file):
    url, seen = flaky_proxy
    args = [f"prompts={prompts_file}", f"policy={url}", f"feedback_model={gen_server}", f"edit_model={gen_server}",
            f"select_model={tiny_model_dir}", "its.feedbacks=2", "its.max_retries=2", "its.concurrency=1"]
    _run(tmp_path, args)
    records = {r["id"]: r for r in _results(tmp_path)}
    summary = json.loads((tmp_path / "summary.json").read_text())
    # one request at a time, in prompt order: p0 got the two 503s and passed on its second retry; p1 (the
    # haiku) failed its try and both retries and is recorded; p2 passed at once; the run finished
    assert "error" not in records["p0"]["candidates"][0] and records["p0"]["final"] is not None
    assert seen["haiku"] == 3 and "InternalServerError" in records["p1"]["candidates"][0]["error"]
    assert records["p1"]["final"] is None and records["p2"]["final"] is not None
    assert summary["models"]["policy"]["errors"] == 1 and summary["models"]["policy"]["calls"] == 3
    assert seen["forwarded"] == 2  # only p0 and p2 reached the model through the proxy
    # a rerun resumes the finished prompts and asks again only for the one with a failed request
    _run(tmp_path, args)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_prompts"] == 2 and seen["haiku"] == 6 and seen["forwarded"] == 2
    assert summary["models"]["policy"]["calls"] == 1 and summary["models"]["policy"]["errors"] == 1
