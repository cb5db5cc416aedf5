"""Generation engines: batched greedy equals one-at-a-time greedy (left padding done right), the
cache resumes an interrupted run, the HTTP engine against a real local server process, and the
batched forward passes (reward scores, log-likelihoods) against one-at-a-time computation."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(300)  # a server that never comes up fails the test instead of hanging CI

CONVERSATIONS = [
    [{"role": "user", "content": f"Question {i}: " + "tell me more " * (3 * i)},
     {"role": "assistant", "content": "A short answer."},
     {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\n<None>"}]
    for i in range(6)
]


@pytest.fixture(scope="module")
def engine(varied_model_dir):
    from eval.engines import HFEngine
    from recipes.config import ModelConfig

    return HFEngine.load(ModelConfig(path=str(varied_model_dir)), None, batch_size=6)


def test_batched_greedy_equals_one_at_a_time(engine):
    from eval.engines import Sampling

    sampling = Sampling(max_new_tokens=12)
    engine.batch_size = 6
    batched = engine.generate(CONVERSATIONS, sampling)
    engine.batch_size = 1
    single = engine.generate(CONVERSATIONS, sampling)
    engine.batch_size = 6
    assert len({g.text for g in single}) > 1, "outputs must differ between prompts for this check to mean anything"
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.finish_reason in ("stop", "length") for g in batched)
    assert all(0 < g.completion_tokens <= 12 for g in batched)


class Interrupted(Exception):
    pass


class DiesAfter:
    """A real engine whose job is killed after it has produced `results` generations."""

    def __init__(self, engine, results: int):
        self.engine, self.results, self.requested = engine, results, []

    @property
    def model_id(self):
        return self.engine.model_id

    def generate(self, conversations, sampling, on_result=None):
        self.requested.extend(conversations)
        done = self.engine.generate(conversations[:self.results], sampling, on_result)
        if len(conversations) > self.results:
            raise Interrupted
        return done


def test_cache_resumes_an_interrupted_run_without_regenerating(engine, tmp_path):
    from eval.engines import GenerationCache, Sampling, generate_cached

    sampling = Sampling(max_new_tokens=8)
    cache_path = tmp_path / "cache.jsonl"
    engine.batch_size = 2
    with pytest.raises(Interrupted):
        generate_cached(DiesAfter(engine, results=3), CONVERSATIONS, sampling, GenerationCache(cache_path))
    engine.batch_size = 6
    with open(cache_path, "a") as f:  # a crash mid-write leaves half a line: ignored on reading
        f.write('{"key": "abc", "generati')
    assert len(GenerationCache(cache_path).entries) == 3

    resumed = DiesAfter(engine, results=100)
    results = generate_cached(resumed, CONVERSATIONS, sampling, GenerationCache(cache_path))
    assert resumed.requested == CONVERSATIONS[3:]  # only what the first run had not finished
    assert [r.text for r in results] == [g.text for g in engine.generate(CONVERSATIONS, sampling)]

    # other sampling settings are other cache entries; repeated conversations are generated once
    again = DiesAfter(engine, results=100)
    generate_cached(again, CONVERSATIONS[:1] * 3, Sampling(max_new_tokens=4), GenerationCache(cache_path))
    assert again.requested == CONVERSATIONS[:1]


@pytest.fixture(scope="module")
def server(varied_model_dir):
    """`python -m eval.serve` as a real process on 127.0.0.1 (any free port)."""
    proc = subprocess.Popen([sys.executable, "-m", "eval.serve", "--model", str(varied_model_dir), "--port", "0",
                             "--name", "tiny", "--max-batch", "8"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "serving tiny on http://127.0.0.1:PORT/v1", once it listens
        assert line.startswith("serving"), f"server did not start: {line!r}"
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _completions(base_url: str) -> int:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health") as r:
        return json.load(r)["completions"]


def test_http_engine_against_local_server_matches_in_process_greedy(server, engine, tmp_path):
    from eval.engines import GenerationCache, HTTPEngine, Sampling, generate_cached

    http = HTTPEngine(server, concurrency=4, max_retries=1, timeout_s=60)
    assert http.model == "tiny"  # found through GET /v1/models
    sampling = Sampling(max_new_tokens=10)
    local = engine.generate(CONVERSATIONS, sampling)
    before = _completions(server)
    remote = generate_cached(http, CONVERSATIONS, sampling, GenerationCache(tmp_path / "c.jsonl"))
    assert [g.text for g in remote] == [g.text for g in local]
    assert [g.finish_reason for g in remote] == [g.finish_reason for g in local]
    assert _completions(server) - before == len(CONVERSATIONS)

    # a rerun is served from the on-disk cache: the server sees no new request
    again = generate_cached(HTTPEngine(server, model="tiny"), CONVERSATIONS, sampling,
                            GenerationCache(tmp_path / "c.jsonl"))
    assert [g.text for g in again] == [g.text for g in local]
    assert _completions(server) - before == len(CONVERSATIONS)


def test_http_engine_errors_are_one_line_user_errors(server):
    from eval.engines import HTTPEngine, Sampling
    from hs3.io import UserError

    bad = HTTPEngine(server, model="tiny", max_retries=0)
    with pytest.raises(UserError, match="BadRequest"):
        bad.generate([[{"role": "user"}]], Sampling(max_new_tokens=2))  # no content: the server answers 400
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot list its models"):
        HTTPEngine("http://127.0.0.1:9/v1", max_retries=1, timeout_s=5)
    assert time.monotonic() - start < 30


def test_mean_logprobs_match_a_direct_computation(engine):
    import torch

    from eval.scoring import mean_logprobs

    tok = engine.tokenizer
    responses = [f"Response number {i}." * (i + 1) for i in range(len(CONVERSATIONS))]
    batched = mean_logprobs(engine.model, tok, CONVERSATIONS, responses, batch_size=4)
    for prompt, response, value in zip(CONVERSATIONS, responses, batched):
        prefix = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        full = tok(tok.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False),
                   add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([full])).logits[0]
        logprobs = torch.log_softmax(logits, -1)
        expected = sum(logprobs[t - 1, full[t]].item() for t in range(len(prefix), len(full))) / (len(full) - len(prefix))
        assert value == pytest.approx(expected, abs=1e-4)


def test_sampling_is_seeded_and_differs_from_greedy(engine):
    from eval.engines import Sampling

    sampled = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=5)
    first = [g.text for g in engine.generate(CONVERSATIONS, sampled)]
    assert first == [g.text for g in engine.generate(CONVERSATIONS, sampled)]
    assert first != [g.text for g in engine.generate(CONVERSATIONS, Sampling(max_new_tokens=8))]


def test_llm_judge_asks_both_orders_through_the_endpoint(server, tmp_path):
    from eval.judge import judge_edits, judge_prompt
    from eval.metrics import JUDGE_TEMPLATE
    from recipes.config import EvalConfig

    text = judge_prompt(CONVERSATIONS[1], "EDIT-ONE", "EDIT-TWO")[0]["content"]
    assert "[Edit A]\nEDIT-ONE" in text and "[Edit B]\nEDIT-TWO" in text
    assert "[Original response]\nA short answer." in text and "<None>" in text  # original and feedback
    assert "better applies the feedback to the original response" in JUDGE_TEMPLATE and "tie" in JUDGE_TEMPLATE
    rows = [{"prompt": c, "original_response": "A short answer.", "reference_edit": f"human edit {i}"}
            for i, c in enumerate(CONVERSATIONS[:3])]
    records = [{"generated": f"model edit {i}", "error": None} for i in range(3)]
    records[2]["error"] = "InternalServerError: generation failed"  # a failed row is not judged
    before = _completions(server)
    wins, failed = judge_edits(rows, records, EvalConfig(judge_endpoint=server, judge_model="tiny", concurrency=4),
                               seed=0, cache_path=tmp_path / "judge.jsonl")
    # each judged row: against the original and against the human edit, both orders
    assert _completions(server) - before == 4 * 2 and failed == 0
    assert wins[2] == {} and all(set(w) == {"gold_judge_win_vs_original", "gold_judge_win_vs_reference"} for w in wins[:2])
    assert all(v in (None, 0.0, 0.25, 0.5, 0.75, 1.0) for w in wins[:2] for v in w.values())


def test_a_row_the_endpoint_fails_on_is_retried_recorded_and_counted_not_fatal(server, varied_model_dir, tmp_path):
    """The eval against the real eval.serve process: one row the server cannot serve (an image part in its
    content): the request fails (retried first when the failure is retryable: 5xx, 429, timeouts), the row
    is recorded with its error and counted, the other rows are scored, and the eval exits 0. A prompt over
    eval.max_prompt_tokens is shortened (tokenizer from model.tokenizer for an endpoint) and the data step's
    over_max_seq_len flag counted. The tiny model never ends its turn: every edit is cut at max_new_tokens,
    so none is judged (a cut edit is no finished one) and the win rates have no rows."""
    from hs3.io import atomic_write_jsonl

    from .conftest import run_cli

    rows = [{"id": f"r{i}", "prompt": c, "original_response": "A short answer.", "reference_edit": "A better answer.",
             "domain": "general", "language": "english"} for i, c in enumerate(CONVERSATIONS[:4])]
    rows[1]["prompt"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                         *CONVERSATIONS[1][1:]]
    rows[3]["over_max_seq_len"] = True  # the data step's flag on a validation line over --max-seq-len
    rows[3]["prompt"] = [{"role": "user", "content": "very long context " * 200}, *CONVERSATIONS[3][1:]]
    atomic_write_jsonl(tmp_path / "data" / "prompts" / "validation.jsonl", rows)
    out = tmp_path / "eval"
    before = _completions(server)
    proc = run_cli("-m", "launcher", "eval", f"model={server}", f"data={tmp_path / 'data'}", "rm=null", f"out={out}",
                   "eval.concurrency=1", "eval.max_retries=2", "eval.max_new_tokens=4", "eval.bootstrap_samples=50",
                   "eval.max_prompt_tokens=300", f"model.tokenizer={varied_model_dir}",
                   f"eval.judge_endpoint={server}", "eval.judge_model=tiny")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 3 edits generated, all cut at 4 tokens: the judge is asked about none of them
    assert _completions(server) - before == 3
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [l["id"] for l in lines] == ["r0", "r1", "r2", "r3"]
    assert lines[1]["finish_reason"] == "error" and lines[1]["error"].split(":")[0] in (
        "BadRequestError", "InternalServerError"), lines[1]["error"]
    assert lines[1]["metrics"] == {} and all(l["error"] is None and l["metrics"] for l in lines[::2])
    assert all(l["finish_reason"] == "length" and "gold_judge_win_vs_original" not in l["metrics"] for l in lines[::2])
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["errors"] == 1 and report["overall"]["copy_rate"]["n"] == 3
    assert report["counts"]["judge_failures"] == 0 and report["gold_judge_win_rate"] is None
    assert report["cut_share"] == 1.0 and report["counts"]["finish_reasons"] == {"stop": 0, "length": 3, "error": 1}
    assert report["counts"]["flagged_too_long"] == 1 and report["counts"]["prompts_shortened"] == 1
    assert lines[3]["prompt_shortened"] and not lines[0]["prompt_shortened"]
    assert "1 of 4 rows failed after retries (first: r1" in proc.stdout
    assert ", 1 rows failed, 3 cut (win rates over the finished):" in proc.stdout
    assert "1 failed requests" in (out / "report.md").read_text()


def test_http_engine_retries_with_backoff_until_the_server_is_up(varied_model_dir):
    """Connection refused while the server is still loading its model: retried, not fatal."""
    import socket

    from eval.engines import HTTPEngine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "eval.serve", "--model", str(varied_model_dir), "--port", str(port),
                             "--name", "late"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        engine = HTTPEngine(f"http://127.0.0.1:{port}/v1", max_retries=8, timeout_s=30)  # lists models: retried
        assert engine.model == "late"
        assert time.monotonic() - start > 0.4  # it did have to wait for the server (first backoff is 0.5 s)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
