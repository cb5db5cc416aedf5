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

from tests.conftest import REPO_ROOT, run_cli, serve_http

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

    cands = [{"index": 0, "text": "r0", "score": 1.0, "finish_reason": "stop", "kept_feedback": [["f"]],
              "edits": [{"set": 0, "sample": 0, "text": "e00", "score": 2.0, "finish_reason": "stop"},
                        {"set": 0, "sample": 1, "text": "e01", "score": 2.0, "finish_reason": "stop"}]},
             {"index": 1, "text": "r1", "score": 2.0, "finish_reason": "stop", "kept_feedback": [], "edits": []},
             {"index": 2, "text": "", "finish_reason": "error", "error": "boom"}]
    final = choose(cands)
    assert final == {"text": "e00", "score": 2.0, "source": "edit", "response": 0, "set": 0, "sample": 0,
                     "kept_feedback": ["f"], "finish_reason": "stop"}
    cands[0]["edits"][0]["score"] = None  # unscored (its endpoint failed, or a NaN score): never chosen
    assert choose(cands)["text"] == "e01"
    cands[1]["score"] = 5.0
    assert choose(cands) == {"text": "r1", "score": 5.0, "source": "response", "response": 1, "finish_reason": "stop"}
    assert choose([{"index": 0, "text": "x", "score": None, "edits": []}]) is None


def test_a_cut_candidate_never_beats_a_finished_one():
    """Issue 17 item 6: a response or edit cut at its.max_new_tokens (finish_reason length) is not an
    answer while a finished one exists, whatever its score; among cut ones only, the best is kept and
    marked cut."""
    from its.loop import choose

    cut_response = {"index": 0, "text": "a long answer that was cut", "score": 9.0, "finish_reason": "length",
                    "kept_feedback": [["f"]],
                    "edits": [{"set": 0, "sample": 0, "text": "cut edit", "score": 8.0, "finish_reason": "length"},
                              {"set": 0, "sample": 1, "text": "done edit", "score": -3.0, "finish_reason": "stop"}]}
    final = choose([cut_response])
    assert final["text"] == "done edit" and final["finish_reason"] == "stop"
    finished = {"index": 1, "text": "short", "score": -5.0, "finish_reason": "stop", "kept_feedback": [], "edits": []}
    cut_response["edits"].pop()
    assert choose([cut_response, finished])["text"] == "short"
    only_cut = choose([cut_response])
    assert only_cut["text"] == "a long answer that was cut" and only_cut["finish_reason"] == "length"


def test_config_errors_are_one_line(tmp_path, prompts_file):
    for args, message in ((["its.feedback_pick=best"], "its.feedback_pick=best"),
                          (["its.feedback_pick=keywords", "its.feedback_sets=2"], "its.feedback_sets=2"),
                          (["its.responses=0"], "its.responses=0"), (["its.max_prompts=0"], "its.max_prompts=0"),
                          (["its.feedback_temperature=-1"], "its.feedback_temperature=-1"),
                          (["its.edit_temperature=-1"], "its.edit_temperature=-1"), (["its.top_p=0"], "its.top_p=0"),
                          (["its.top_p=1.5"], "its.top_p=1.5"), (["its.prompts_in_flight=0"], "its.prompts_in_flight=0"),
                          (["its.concurrency_by_role.judge=2"], "its.concurrency_by_role.judge=2"),
                          (["its.concurrency_by_role.policy=0"], "its.concurrency_by_role.policy=0")):
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
    from its.loop import request_seed, samplings
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
                # with its own seed: (run seed, prompt id, step, response, sample)
                seed = request_seed(cfg.seed, r["id"], "feedback", c["index"], f)
                key = Generator.request_key(_model_ids(tmp_path, "feedback_model")[0], request,
                                            sampling["feedback_model"], seed)
                assert feedback_cache.entries[key].text == item["text"]
            assert len(c["edits"]) == 2 * len(c["kept_feedback"])
            for e in c["edits"]:  # asked in the seed's edit-request format, byte for byte
                conversation = build_edit_conversation(r["prompt"], c["text"], c["kept_feedback"][e["set"]])
                key = Generator.request_key(_model_ids(tmp_path, "edit_model")[0], conversation, sampling["edit_model"],
                                            request_seed(cfg.seed, r["id"], "edit", c["index"], e["set"], e["sample"]))
                assert edit_cache.entries[key].text == e["text"]
            every += [c, *c["edits"]]
        # every candidate scored by the select model as [context..., assistant: text]
        expected = scorer.score([r["prompt"] + [{"role": "assistant", "content": x["text"]}] for x in every])
        assert [x["score"] for x in every] == pytest.approx(expected, abs=1e-5)
        finished = [x["score"] for x in every if x["finish_reason"] == "stop"]
        assert r["final"]["score"] == pytest.approx(max(finished or expected), abs=1e-5)
        assert r["final"]["text"] in [x["text"] for x in every]
    assert summary["select_score"]["prompts_scored"] == 3 and summary["failed_requests"] == 0
    assert summary["select_score"]["is_proxy"] and "proxy" in summary["notes"][1]
    assert summary["models"]["policy"]["calls"] == 6 and summary["models"]["feedback_model"]["calls"] == 18
    # 8 new tokens: the tiny model never ends its turn, so every response and edit is counted as cut
    assert summary["cut"]["responses"] == summary["cut"]["of_responses"] == 6 and summary["finals_cut"] == 3
    assert "mean nothing" in summary["notes"][0] and (tmp_path / "select_scores.png").stat().st_size > 0
    assert result["metric"] == "select_score_gain (proxy)" and (tmp_path / "config.yaml").is_file()
    assert "select_score_gain (proxy" in (tmp_path / "report.md").read_text()


def _model_ids(out: Path, role: str) -> list[str]:
    from eval.engines import dir_fingerprint

    spec = json.loads((out / "summary.json").read_text())["models"][role]["model"]
    return [f"{spec}@{dir_fingerprint(spec)}"]


# ---- resume after a crash ------------------------------------------------------------------------

def test_a_crash_resumes_from_finished_prompts_and_cached_calls(tmp_path, varied_model_dir, tiny_model_dir, prompts_file,
                                                               monkeypatch):
    from its import models as its_models

    args = [f"prompts={prompts_file}", f"policy={varied_model_dir}", f"feedback_model={varied_model_dir}",
            f"edit_model={varied_model_dir}", f"select_model={tiny_model_dir}", "its.prompts_in_flight=1", "its.feedbacks=2"]
    real = its_models.Generator.generate
    edit_calls = []

    def crash_on_third_prompts_edits(self, requests, sampling):
        if self.role == "edit_model":
            edit_calls.append(len(requests))
            if len(edit_calls) == 3:
                raise RuntimeError("killed")
        return real(self, requests, sampling)

    monkeypatch.setattr(its_models.Generator, "generate", crash_on_third_prompts_edits)
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
    assert "[its]" in proc.stdout and "select_score_gain" in proc.stdout

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
    from http.server import BaseHTTPRequestHandler

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

    with serve_http(Handler) as url:
        yield f"{url}/v1", seen


def test_a_flaky_endpoint_is_retried_and_a_request_that_keeps_failing_is_recorded(tmp_path, flaky_proxy, gen_server,
                                                                                   tiny_model_dir, prompts_file):
    url, seen = flaky_proxy
    args = [f"prompts={prompts_file}", f"policy={url}", f"feedback_model={gen_server}", f"edit_model={gen_server}",
            f"select_model={tiny_model_dir}", "its.feedbacks=2", "its.max_retries=2", "its.concurrency=1",
            "its.prompts_in_flight=1"]
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


# ---- independent draws (issue 17 item 7) ---------------------------------------------------------

def test_sixteen_sampled_copies_of_one_conversation_are_sixteen_distinct_draws(tmp_path, tiny_model_dir):
    """Every sampled request has its own seed from (prompt id, step, index): 16 responses of one prompt on
    the tiny model, in two batches of 8, are 16 different texts (a batch re-seeded with one seed gave only
    8), and so are the 16 feedback texts of one response; a rerun draws the very same texts."""
    from its.loop import request_seed

    prompts = tmp_path / "one.jsonl"
    prompts.write_text(json.dumps({"id": "q", "prompt": "Write a haiku about rain."}) + "\n")
    args = [f"prompts={prompts}", *(f"{role}={tiny_model_dir}" for role in
                                    ("policy", "feedback_model", "edit_model", "select_model")),
            "its.responses=16", "its.feedbacks=16", "its.edits=1", "its.max_new_tokens=8",
            "its.feedback_max_new_tokens=8", "its.batch_size=8"]
    _run(tmp_path / "a", args)
    [record] = _results(tmp_path / "a")
    responses = [c["text"] for c in record["candidates"]]
    assert len(responses) == 16 and len(set(responses)) == 16
    for c in record["candidates"]:
        assert len({f["text"] for f in c["feedback"]}) == 16
    assert len({request_seed(1234, "q", "response", j) for j in range(16)}) == 16
    _run(tmp_path / "b", args)
    assert _results(tmp_path / "b") == [record]


# ---- a Select score that is not a number (issue 17 item 6) -----------------------------------------

@pytest.fixture()
def nan_rm_proxy(rm_server):
    """A real HTTP proxy in front of eval.serve_rm that answers every /pooling request about the haiku
    prompt with a NaN reward (JSON NaN, as a broken server writes it) and forwards the rest."""
    from http.server import BaseHTTPRequestHandler

    seen = {"nan": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, status: int, data: bytes):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _forward(self, body):
            request = urllib.request.Request(rm_server.removesuffix("/v1") + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request) as reply:
                self._reply(reply.status, reply.read())

        def do_GET(self):
            self._forward(None)

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if b"haiku" in body:
                seen["nan"] += 1
                return self._reply(200, b'{"object": "list", "data": [{"index": 0, "object": "pooling", "data": [NaN]}]}')
            self._forward(body)

    with serve_http(Handler) as url:
        yield f"{url}/v1", seen


def test_a_nan_select_score_from_an_endpoint_is_a_recorded_failure(tmp_path, nan_rm_proxy, varied_model_dir,
                                                                   prompts_file):
    url, seen = nan_rm_proxy
    args = [f"prompts={prompts_file}", f"policy={varied_model_dir}", f"feedback_model={varied_model_dir}",
            f"edit_model={varied_model_dir}", f"select_model={url}", "its.feedbacks=2", "its.max_retries=0"]
    _run(tmp_path, args)
    records = {r["id"]: r for r in _results(tmp_path)}
    summary = json.loads((tmp_path / "summary.json").read_text())
    haiku = records["p1"]
    assert seen["nan"] == 2  # the response and its edit
    assert haiku["final"] is None and all(x.get("score") is None for x in [haiku["candidates"][0], *haiku["candidates"][0]["edits"]])
    assert summary["models"]["select_model"]["errors"] == 2 and summary["failed_requests"] == 2
    assert "non-finite score nan" in summary["models"]["select_model"]["errors_seen"][0]
    assert all(records[p]["final"] is not None and isinstance(records[p]["final"]["score"], float) for p in ("p0", "p2"))
    cached = [json.loads(line) for line in (tmp_path / "cache" / "select_model.jsonl").read_text().splitlines()]
    assert len(cached) == 4 and all(isinstance(c["score"], float) for c in cached)  # a NaN is never cached
    # a rerun asks again for the prompt with the failed score only
    _run(tmp_path, args)
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_prompts"] == 2 and seen["nan"] == 4


def test_a_local_select_model_scoring_nan_is_a_failure_and_stops_the_run_with_one_line(tmp_path, tiny_rm_dir,
                                                                                       varied_model_dir, prompts_file):
    """The same rule for a local model: a reward head with NaN weights scores NaN; its scores are failures,
    never cached, and a model that answered none of its first requests stops the run with one line."""
    import threading

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from eval.reward_scorers import load_scorer
    from its.models import LocalWorker, Selector

    nan_rm = tmp_path / "nan_rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(nan_rm)
    AutoTokenizer.from_pretrained(tiny_rm_dir).save_pretrained(nan_rm)
    worker = LocalWorker("nan", 8)
    selector = Selector(str(nan_rm), load_scorer(str(nan_rm)), tmp_path / "cache.jsonl", worker=worker,
                        stop=threading.Event())
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert selector.score([conversation, conversation + [{"role": "user", "content": "x"}]]) == [None, None]
    assert selector.stats.errors == 2 and selector.stats.errors_seen[0] == "non-finite score nan"
    assert not (tmp_path / "cache.jsonl").exists() or (tmp_path / "cache.jsonl").read_text() == ""
    worker.stop()
    proc = run_cli("-m", "launcher", "its", f"prompts={prompts_file}", f"policy={varied_model_dir}",
                   f"feedback_model={varied_model_dir}", f"edit_model={varied_model_dir}", f"select_model={nan_rm}",
                   "its.responses=3", "its.feedbacks=1", *SMALL, f"out={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "select model" in line and "non-finite score nan" in line
    assert not (tmp_path / "run" / "summary.json").exists()


# ---- the loop overlaps prompts; concurrency per role (issue 20) ------------------------------------

@pytest.fixture()
def counting_proxy(gen_server):
    """A real HTTP proxy in front of eval.serve that holds each chat request 0.15 s and records, per kind
    of request (response, feedback, edit: told apart by their text), how many were in flight at once,
    and whether an edit was ever in flight while a feedback request was."""
    import threading
    import time as _time
    from http.server import BaseHTTPRequestHandler

    from data_prep.feedback import EDIT_REQUEST_PREFIX
    from data_prep.feedback_prompt import FEEDBACK_INSTRUCTION

    state = {"now": {"response": 0, "feedback": 0, "edit": 0}, "max": {"response": 0, "feedback": 0, "edit": 0},
             "edit_during_feedback": False}
    lock = threading.Lock()
    marker_feedback = json.dumps(FEEDBACK_INSTRUCTION)[1:40].encode()
    marker_edit = json.dumps(EDIT_REQUEST_PREFIX)[1:40].encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _fetch(self, body) -> tuple[int, bytes]:
            request = urllib.request.Request(gen_server.removesuffix("/v1") + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request) as reply:
                return reply.status, reply.read()

        def _reply(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply(*self._fetch(None))

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            kind = "edit" if marker_edit in body else "feedback" if marker_feedback in body else "response"
            with lock:
                state["now"][kind] += 1
                state["max"][kind] = max(state["max"][kind], state["now"][kind])
                if state["now"]["edit"] and state["now"]["feedback"]:
                    state["edit_during_feedback"] = True
            try:
                _time.sleep(0.15)
                status, data = self._fetch(body)
            finally:  # out of flight before the client can see the reply (and send its next request)
                with lock:
                    state["now"][kind] -= 1
            self._reply(status, data)

    with serve_http(Handler) as url:
        yield f"{url}/v1", state


def test_prompts_overlap_and_each_role_keeps_its_own_concurrency(tmp_path, counting_proxy, rm_server, prompts_file):
    url, state = counting_proxy
    many = tmp_path / "prompts.jsonl"
    many.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question number {i}?"}) + "\n" for i in range(6)))
    _run(tmp_path / "run", [f"prompts={many}", f"policy={url}", f"feedback_model={url}", f"edit_model={url}",
                            f"select_model={rm_server}", "its.feedbacks=3", "its.prompts_in_flight=6",
                            "its.concurrency=4", "its.concurrency_by_role.feedback_model=2",
                            "its.concurrency_by_role.edit_model=1"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["prompts"] == 6 and summary["failed_requests"] == 0
    # each role's limit held, and was reached (6 prompts in flight ask at once)
    assert state["max"] == {"response": 4, "feedback": 2, "edit": 1}, state
    # a prompt's edit ran while other prompts were still being given feedback: steps overlap across prompts
    assert state["edit_during_feedback"]
    assert summary["models"]["feedback_model"]["concurrency"] == 2 and summary["models"]["policy"]["concurrency"] == 4


# ---- the prompts file (issue 18) -----------------------------------------------------------------

def test_a_prompts_file_with_a_bom_a_bad_first_line_or_utf16_is_read_or_refused_in_one_line(tmp_path):
    from its.loop import load_prompts
    from recipes.config import compose

    def load(path):
        return load_prompts(compose("its", [f"prompts={path}", f"out={tmp_path}/o"]))

    good = [json.dumps(p) for p in PROMPTS]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(good).encode() + b"\n")
    prompts, rejected = load(bom)
    assert [p["id"] for p in prompts] == ["p0", "p1", "p2"] and rejected == []
    # a malformed first line (and others) are rejected with their own line and id, never the previous row's
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(['{"id": "broken", "prompt": ', good[0], '{"id": "x1", "messages": []}', "[1, 2]",
                                '{"id": ["list"], "prompt": "q"}', good[1]]) + "\n")
    prompts, rejected = load(mixed)
    assert [p["id"] for p in prompts] == ["p0", "p1"]
    assert [(r["line"], r["id"]) for r in rejected] == [(1, None), (3, "x1"), (4, None), (5, ["list"])]
    assert "no `messages` list" in rejected[1]["reason"] and "not a JSON object" in rejected[2]["reason"]
    for name, data in (("utf16.jsonl", "\n".join(good).encode("utf-16")), ("binary.jsonl", b"\x00\xff\xfe" * 10)):
        (tmp_path / name).write_bytes(data)
        proc = run_cli("-m", "launcher", "its", f"prompts={tmp_path / name}", f"out={tmp_path}/o", "--dry-run")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not UTF-8" in proc.stderr, proc.stderr
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("not json\n")
    proc = run_cli("-m", "launcher", "its", f"prompts={only_bad}", f"out={tmp_path}/o", "--dry-run")
    assert proc.returncode == 2 and "no usable prompt (1 rejected; line 1:" in proc.stderr and "Traceback" not in proc.stderr


def test_the_run_writes_each_rejected_row_with_its_own_id(tmp_path, varied_model_dir, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([json.dumps(PROMPTS[0]), '{"id": "bad1", "messages": [{"role": "assistant", "content": "x"}]}',
                                  json.dumps(PROMPTS[1]), '{"id": "bad2"}']) + "\n")
    _run(tmp_path / "run", [f"prompts={prompts}", *(f"{r}={varied_model_dir}" for r in ("policy", "feedback_model", "edit_model")),
                            f"select_model={tiny_model_dir}", "its.feedbacks=1"])
    rejected = [json.loads(line) for line in (tmp_path / "run" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["id"]) for r in rejected] == [(2, "bad1"), (4, "bad2")]


# ---- its-eval reads untrusted files (issue 18) ----------------------------------------------------

def _its_dir(root: Path, results: bytes | None = None, summary: bytes | None = None) -> Path:
    """An its output dir as the stage writes it (summary.json and results.jsonl), or with the given bytes."""
    root.mkdir(parents=True, exist_ok=True)
    good = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Q{i}?"}],
             "candidates": [{"index": 0, "text": f"first {i}", "finish_reason": "stop"}],
             "final": {"text": f"final {i}", "score": 1.0, "source": "edit", "response": 0, "finish_reason": "stop"}}
            for i in range(3)]
    (root / "results.jsonl").write_bytes(results if results is not None else
                                         "".join(json.dumps(r) + "\n" for r in good).encode())
    (root / "summary.json").write_bytes(summary if summary is not None else json.dumps(
        {"stage": "its", "metric": "select_score_gain", "value": 0.1,
         "models": {"policy": {"model": "/m/policy"}, "select_model": {"model": "/m/select"}},
         "settings": {"responses": 1}}).encode())
    return root


ROW = {"id": "p9", "prompt": [{"role": "user", "content": "Q?"}], "candidates": [{"index": 0, "text": "t"}],
       "final": {"text": "f"}}
HOSTILE_RESULTS = {
    "empty": b"",
    "only_blank_lines": b"\n\n",
    "cut_line": json.dumps(ROW).encode()[:40],
    "not_json": b"hello\n",
    "a_list": b"[1, 2]\n",
    "null": b"null\n",
    "no_id": json.dumps({k: v for k, v in ROW.items() if k != "id"}).encode(),
    "int_id": json.dumps({**ROW, "id": 3}).encode(),
    "prompt_string": json.dumps({**ROW, "prompt": "Q?"}).encode(),
    "prompt_bad_turn": json.dumps({**ROW, "prompt": [{"role": "user"}]}).encode(),
    "final_string": json.dumps({**ROW, "final": "f"}).encode(),
    "final_without_text": json.dumps({**ROW, "final": {"score": 1}}).encode(),
    "duplicate_id": (json.dumps(ROW) + "\n" + json.dumps(ROW)).encode(),
    "not_utf8": b'{"id": "\xff"}\n',
    "utf16": json.dumps(ROW).encode("utf-16"),
    "deep": b"[" * 100000 + b"]" * 100000,
}
HOSTILE_FIRST = {  # DIR:first reads the first response
    "no_candidates": json.dumps({**ROW, "candidates": []}).encode(),
    "candidate_not_object": json.dumps({**ROW, "candidates": ["t"]}).encode(),
    "candidate_without_text": json.dumps({**ROW, "candidates": [{"index": 0}]}).encode(),
}
HOSTILE_SUMMARY = {
    "missing": None, "not_json": b"{", "a_list": b"[]", "other_stage": b'{"stage": "eval", "models": {}, "settings": {}}',
    "models_not_object": b'{"stage": "its", "models": [], "settings": {}}', "not_utf8": b"\xff\xfe",
}


def _its_eval_one_line(*args) -> str:
    """its-eval's entry point in this process (the CLI wrapper `./launch.sh its-eval` calls): an exception
    other than the one-line UserError would fail the test here."""
    import contextlib
    import io

    from its.evaluate import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    return lines[0]


@pytest.mark.parametrize("case", sorted(HOSTILE_RESULTS) + [f"first:{c}" for c in sorted(HOSTILE_FIRST)]
                         + [f"summary:{c}" for c in sorted(HOSTILE_SUMMARY)])
def test_its_eval_refuses_a_damaged_side_in_one_line(case, tmp_path):
    good = _its_dir(tmp_path / "good")
    if case.startswith("summary:"):
        bad = _its_dir(tmp_path / "bad")
        content = HOSTILE_SUMMARY[case.split(":")[1]]
        if content is None:
            (bad / "summary.json").unlink()
        else:
            (bad / "summary.json").write_bytes(content)
        spec, expected = str(bad), "summary.json"
    elif case.startswith("first:"):
        bad = _its_dir(tmp_path / "bad", results=HOSTILE_FIRST[case.split(":")[1]])
        spec, expected = f"{bad}:first", "results.jsonl line 1"
    else:
        bad = _its_dir(tmp_path / "bad", results=HOSTILE_RESULTS[case])
        spec, expected = str(bad), "results.jsonl"
    line = _its_eval_one_line(str(good), spec, "judge=http://127.0.0.1:9/v1")
    assert expected in line and "bad" in line, line
    assert not (good / "its-eval").exists()


def test_its_eval_reads_a_finished_run_and_refuses_bad_options(tmp_path):
    from its.evaluate import load_side

    good = _its_dir(tmp_path / "good")
    name, side, made = load_side(str(good))
    assert name == "good" and side["p1"] == {"prompt": [{"role": "user", "content": "Q1?"}], "text": "final 1"}
    assert made["models"] == {"policy": "/m/policy", "select_model": "/m/select"} and made["side"] == "finals"
    assert load_side(f"{good}:first")[1]["p2"]["text"] == "first 2"
    (tmp_path / "file").write_text("x")
    for option, message in (("samples=-1", "samples=-1 must be >= 1"), ("concurrency=0", "concurrency=0"),
                            ("max_new_tokens=abc", "max_new_tokens=abc is not an integer"),
                            ("max_retries=-2", "max_retries=-2"), ("judge=ftp://x", "judge=ftp://x is not an http(s)"),
                            (f"out={tmp_path / 'file'}", "is not a directory")):
        args = [str(good), f"{good}:first", option]
        if not option.startswith("judge="):
            args.append("judge=http://127.0.0.1:9/v1")
        assert message in _its_eval_one_line(*args)


def test_the_per_row_sampler_draws_from_the_warped_distribution():
    """eval.engines.SeededRowSampler: each row's token follows softmax(logits / temperature) within the top-p
    nucleus, tokens outside it are never drawn, and a row's draw depends on its own seed only."""
    import torch

    from eval.engines import Sampling, SeededRowSampler

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rows = 4000
    scores = logits.repeat(rows, 1)
    picked = SeededRowSampler(range(rows), Sampling(temperature=1.0, top_p=1.0), "cpu")(None, scores.clone()).argmax(-1)
    freq = torch.bincount(picked, minlength=4).float() / rows
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), freq
    nucleus = SeededRowSampler(range(rows), Sampling(temperature=1.0, top_p=0.7), "cpu")(None, scores.clone()).argmax(-1)
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.7: tokens 2 and 3 are outside the nucleus
    again = SeededRowSampler([7, 3], Sampling(temperature=1.0), "cpu")(None, scores[:2].clone()).argmax(-1)
    alone = SeededRowSampler([3], Sampling(temperature=1.0), "cpu")(None, scores[:1].clone()).argmax(-1)
    assert again[1] == alone[0] and again[0] == picked[7]


def test_local_models_load_at_their_own_dtype_not_the_presets(tiny_model_dir, tiny_rm_dir, tmp_path):
    """Each local model of the loop (generators and the Select model) is loaded at the dtype its training
    record names (else its config.json's), never the composed preset's: `its policy=DIR` sits on the tiny
    preset (float32), where a 70B checkpoint trained in bf16 would load at twice its size."""
    import shutil

    import torch

    from its.models import Models
    from recipes.config import compose

    policy, select = tmp_path / "policy", tmp_path / "select"
    shutil.copytree(tiny_model_dir, policy)
    shutil.copytree(tiny_rm_dir, select)
    for model, seq_len in ((policy, 512), (select, 256)):
        (model / "hs3_training.json").write_text(json.dumps({"stage": "sft", "trained_on": [], "dtype": "bfloat16",
                                                             "seq_len": seq_len}))
    cfg = compose("its", [f"out={tmp_path}/out", f"policy={policy}", f"feedback_model={policy}",
                          f"edit_model={policy}", f"select_model={select}"])
    assert cfg.model.dtype == "float32"  # the preset's
    models = Models(cfg, tmp_path / "cache")
    try:
        assert models.generators["policy"].engine.model.dtype == torch.bfloat16
        assert models.selector.scorer.model.dtype == torch.bfloat16 and models.selector.scorer.max_length == 256
    finally:
        models.halt()


def test_an_out_dir_with_someone_elses_files_is_refused_and_left_untouched(tmp_path, prompts_file):
    """A rerun replaces config.yaml, summary.json and results.jsonl, so its refuses (before it removes or writes
    anything) an out= holding files an its run did not write, or another stage's config.yaml."""
    dead = "http://127.0.0.1:9/v1"
    models = [f"{role}={dead}" for role in ("policy", "feedback_model", "edit_model", "select_model")]
    cases = {"notes": {"summary.json": '{"mine": 1}', "notes.txt": "my notes"},
             "sft": {"config.yaml": "stage: sft\n", "summary.json": '{"stage": "sft"}'},
             "user_yaml": {"config.yaml": "name: my experiment\n", "results.jsonl": "{}\n"}}
    for name, files in cases.items():
        out = tmp_path / name
        out.mkdir()
        for file, text in files.items():
            (out / file).write_text(text)
        proc = run_cli("-m", "launcher", "its", f"prompts={prompts_file}", *models, "its.max_retries=0", f"out={out}")
        assert proc.returncode == 2 and f"out={out}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert {p.name: p.read_text() for p in out.iterdir()} == files  # nothing removed, nothing added
    # an its run of its own (config.yaml of stage its, or only what its writes) passes this check and goes on
    # to the endpoint check, which fails on the dead endpoint
    own = tmp_path / "own"
    own.mkdir()
    (own / "progress.jsonl").write_text("")
    (own / "cache").mkdir()
    proc = run_cli("-m", "launcher", "its", f"prompts={prompts_file}", *models, "its.max_retries=0", f"out={own}")
    assert proc.returncode == 2 and "127.0.0.1:9" in proc.stderr and f"out={own}:" not in proc.stderr, proc.stderr
