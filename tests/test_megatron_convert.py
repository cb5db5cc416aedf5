"""The convert stage against the upstream code that writes and refuses its destinations (issue 16,
findings 2, 3 and 4): Megatron-Bridge's prepare_output_directory (scripts/conversion/utils.py:135-156 at
the pinned commit) inside the conversion-worker PROBE, and NeMo-RL's own DCP->HF converter
(examples/converters/convert_dcp_to_hf.py -> nemo_rl/utils/native_checkpoint.py:208-282) run for real on a
tiny reward model that NeMo-RL's own save_checkpoint and CheckpointManager wrote on CPU. The sources come
from tests/upstream.toml (tests.upstream: a test skips, naming the fetch script, when one is absent)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipes.config import REPO_ROOT, compose
from recipes.megatron import build_command as job_command_of, convert
from launcher.stages import is_finished
from tests.upstream import on_path, source

PROBES = REPO_ROOT / "tests" / "probes"
CONVERSATION = [{"role": "user", "content": "Write a haiku about rain."},
                {"role": "assistant", "content": "Rain falls."},
                {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:"
                                            "\n\nToo short."},
                {"role": "assistant", "content": "Rain falls softly on the roof tonight."}]


def run_job(cfg, env: dict) -> subprocess.CompletedProcess:
    """The command the SLURM job runs (recipes.megatron.build_command), from the repo root."""
    command = job_command_of(cfg)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` = this venv's
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": path, **env})


def tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


# ---- finding 3: Megatron-Bridge's conversions run once, into an empty place ---------------------------

@pytest.fixture
def mb_scripts():
    return source("megatron_bridge", "git") / "scripts" / "conversion"


def mb_utils(mb_scripts: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mb_conversion_utils", mb_scripts / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_megatron_bridge_conversion_runs_once_and_resubmits_as_a_no_op(mb_scripts, tiny_model_dir, tmp_path):
    """import (HF -> Megatron) and export (Megatron -> HF) as their SLURM jobs run them, twice: the second
    time the destination holds the first run's conversion, and the job ends without calling the worker,
    whose own check (Megatron-Bridge's prepare_output_directory) would refuse it (FileExistsError: what
    cancelled the resubmitted chain, finding 3)."""
    record = tmp_path / "worker.jsonl"
    env = {"PROBE_RECORD": str(record), "PROBE_MB_SCRIPTS": str(mb_scripts)}
    common = ["engine=megatron", f"run_dir={tmp_path / 'run'}", f"megatron.megatron_bridge_dir={PROBES / 'megatron_bridge'}"]
    imported = compose("convert", [*common, "name=import", "out=${run_dir}/import", f"init={tiny_model_dir}"])
    exported = compose("convert", [*common, "name=sft_export", "out=${run_dir}/sft_export",
                                   "megatron.convert_direction=megatron_to_hf", f"init={tmp_path / 'run' / 'import' / 'converted'}",
                                   f"megatron.hf_model_id={tiny_model_dir}", "megatron.convert_dest=${run_dir}/sft/final"])
    for cfg in (imported, exported):
        assert not is_finished(cfg)
        first = run_job(cfg, env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert is_finished(cfg)  # summary.json with both fingerprints: the pipeline skips it now
        summary = json.loads((Path(cfg.out) / "summary.json").read_text())
        assert summary["dest"] == str(convert.destination(cfg)) and summary["source_fingerprint"]["location"] == convert.source(cfg)
    hf_dir = convert.destination(exported)
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["argv"][0] for c in calls] == ["import", "export"]
    assert calls[0]["argv"][calls[0]["argv"].index("--megatron-path") + 1] == str(convert.staging_dir(convert.destination(imported)))
    before = {cfg.name: tree(convert.destination(cfg)) for cfg in (imported, exported)}

    for cfg in (imported, exported):  # resubmitted
        again = run_job(cfg, env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "already holds the conversion" in again.stdout
    assert len(record.read_text().splitlines()) == 2  # the worker was not called again
    assert {cfg.name: tree(convert.destination(cfg)) for cfg in (imported, exported)} == before
    # what the old job (the worker, straight into the destination) met on a resubmission:
    with pytest.raises(FileExistsError, match="Destination is not empty"):
        mb_utils(mb_scripts).prepare_output_directory(str(hf_dir), overwrite=False)


def test_a_destination_the_stage_did_not_write_is_refused_and_left_alone(mb_scripts, tiny_model_dir, tmp_path):
    """Never convert over, or delete, what is in the destination unless it is this stage's record of the
    same source: a changed source, a user's files, a staging dir this stage did not create. A staging dir
    left by a killed attempt (with this stage's marker) is cleared and the conversion runs."""
    env = {"PROBE_RECORD": str(tmp_path / "worker.jsonl"), "PROBE_MB_SCRIPTS": str(mb_scripts)}
    model = tmp_path / "model"
    subprocess.run(["cp", "-r", str(tiny_model_dir), str(model)], check=True)
    cfg = compose("convert", ["engine=megatron", f"run_dir={tmp_path / 'run'}", f"init={model}",
                              "megatron.convert_dest=${run_dir}/megatron_model",
                              f"megatron.megatron_bridge_dir={PROBES / 'megatron_bridge'}"])
    dest = convert.destination(cfg)
    dest.mkdir(parents=True)  # an existing empty destination is fine (the staging dir replaces it)
    assert run_job(cfg, env).returncode == 0 and is_finished(cfg)
    before = tree(dest)

    (model / "generation_config.json").write_text('{"changed": true}')  # the source changed
    assert not is_finished(cfg)
    refused = run_job(cfg, env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"{dest} is not empty and is not this stage's conversion of {model}" in refused.stderr
    assert tree(dest) == before

    users = tmp_path / "run" / "users"
    (users / "mine").mkdir(parents=True)
    (users / "mine" / "notes.txt").write_text("keep me")
    other = compose("convert", ["engine=megatron", f"run_dir={tmp_path / 'run'}", "name=other", "out=${run_dir}/other",
                                f"init={model}", f"megatron.convert_dest={users / 'mine'}",
                                f"megatron.megatron_bridge_dir={PROBES / 'megatron_bridge'}"])
    assert run_job(other, env).returncode == 2 and (users / "mine" / "notes.txt").read_text() == "keep me"

    fresh = compose("convert", ["engine=megatron", f"run_dir={tmp_path / 'run'}", "name=fresh", "out=${run_dir}/fresh",
                                f"init={model}", f"megatron.convert_dest={users / 'new'}",
                                f"megatron.megatron_bridge_dir={PROBES / 'megatron_bridge'}"])
    staging = convert.staging_dir(users / "new")
    staging.mkdir()
    (staging / "half-written").write_text("x")
    stranger = run_job(fresh, env)  # no marker: not this stage's
    assert stranger.returncode == 2 and "did not create it" in stranger.stderr and (staging / "half-written").exists()
    convert.staging_marker(users / "new").write_text("{}")  # a killed attempt of this stage
    assert run_job(fresh, env).returncode == 0
    assert (users / "new" / "PROBE_RECORD.json").is_file() and not staging.exists()
    assert not convert.staging_marker(users / "new").exists()


# ---- findings 3 and 4: NeMo-RL's DCP -> HF converter, run for real on a tiny reward model --------------

@pytest.fixture
def nemo_rl_rm_checkpoint(monkeypatch, tiny_model_dir, tiny_rm_dir, tmp_path) -> Path:
    """rm/checkpoints/step_3 as NeMo-RL writes it: CheckpointManager's step layout and config.yaml
    (utils/checkpoint.py:195-266), the DTensor (v1) weights saved by native_checkpoint.save_checkpoint
    with the tokenizer (rm.py:643-664). The model is the one NeMo-RL's DTensor worker builds for a
    Bradley-Terry reward model: AutoModelForSequenceClassification of policy.model_name (the sft model, a
    causal LM) with num_labels=1 (dtensor_policy_worker.py:296-311); here a tiny one."""
    on_path(monkeypatch, "nemo_rl", "git")
    from pydantic import BaseModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from nemo_rl.utils.checkpoint import CheckpointManager
    from nemo_rl.utils.native_checkpoint import save_checkpoint

    class RunConfig(BaseModel):
        policy: dict
        checkpointing: dict

    checkpointing = {"enabled": True, "checkpoint_dir": str(tmp_path / "rm" / "checkpoints"), "metric_name": None,
                     "higher_is_better": False, "keep_top_k": None, "save_optimizer": False}
    policy = {"model_name": str(tiny_model_dir), "tokenizer": {"name": str(tiny_model_dir)},
              "reward_model_cfg": {"enabled": True, "reward_model_type": "bradley_terry"},
              "dtensor_cfg": {"enabled": True}, "megatron_cfg": {"enabled": False}}
    manager = CheckpointManager(checkpointing)
    step = manager.init_tmp_checkpoint(3, {"step": 3}, RunConfig(policy=policy, checkpointing=checkpointing))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir, num_labels=1)
    save_checkpoint(model, str(Path(step) / "policy" / "weights"), tokenizer=AutoTokenizer.from_pretrained(tiny_rm_dir),
                    tokenizer_path=str(Path(step) / "policy" / "tokenizer"))
    manager.finalize_checkpoint(step)
    return tmp_path / "rm" / "checkpoints"


def test_rm_export_loads_in_the_proxy_scorer_and_runs_once(nemo_rl_rm_checkpoint, tiny_rm_dir, tmp_path, monkeypatch):
    """rm_export as its job runs it, with NeMo-RL's real converters: rm/final loads in our proxy scorer
    (eval.reward_scorers.load_scorer, eval.run.proxy_scorer) and scores exactly as the reward model that
    was saved; NeMo-RL's converter alone writes the causal LM's config.json and the eval cannot load it
    (finding 4). A resubmission does not convert again: NeMo-RL refuses any existing destination, even an
    empty one (finding 3)."""
    nemo_rl = source("nemo_rl", "git")
    run_dir = tmp_path / "run"
    cfg = compose("convert", ["engine=megatron", f"run_dir={run_dir}", "name=rm_export", "out=${run_dir}/rm_export",
                              "megatron.convert_direction=nemo_rl_to_hf", f"init={nemo_rl_rm_checkpoint}",
                              "megatron.convert_dest=${run_dir}/rm/final", f"megatron.nemo_rl_dir={nemo_rl}"])
    env = {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{nemo_rl}"}
    first = run_job(cfg, env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    final = run_dir / "rm" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1  # num_labels
    assert config["pad_token_id"] == 5  # <|finetune_right_pad_id|>, not <|eot_id|>

    from eval.reward_scorers import load_scorer
    from eval.run import proxy_scorer

    expected = load_scorer(str(tiny_rm_dir), "seqcls").score([CONVERSATION])
    assert load_scorer(str(final)).kind == "seqcls"
    assert load_scorer(str(final)).score([CONVERSATION]) == pytest.approx(expected, abs=1e-5)
    eval_cfg = compose("eval", ["engine=megatron", f"run_dir={run_dir}"])
    assert proxy_scorer(str(final), eval_cfg).score([CONVERSATION]) == pytest.approx(expected, abs=1e-5)

    # without our step: NeMo-RL's converter alone, as rm_export ran it before
    on_path(monkeypatch, "nemo_rl", "git")
    from nemo_rl.utils.native_checkpoint import convert_dcp_to_hf

    step = nemo_rl_rm_checkpoint / "step_3"
    model_name = yaml.safe_load((step / "config.yaml").read_text())["policy"]["model_name"]  # the sft model
    raw = convert_dcp_to_hf(str(step / "policy" / "weights"), str(tmp_path / "raw"), model_name,
                            str(step / "policy" / "tokenizer"))
    assert json.loads((Path(raw) / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    from hs3.io import UserError
    from recipes.models import reward_head_mismatch

    assert reward_head_mismatch(raw).startswith("its score head has 1 output(s) but its config.json asks for 2")
    with pytest.raises(UserError, match="its weights do not have the shapes"):  # score.weight [1, 64] vs [2, 64]
        proxy_scorer(raw, eval_cfg)
    assert reward_head_mismatch(str(final)) is None

    before = tree(final)
    again = run_job(cfg, env)
    assert again.returncode == 0 and "already holds the conversion" in again.stdout, again.stderr[-2000:]
    assert tree(final) == before
    for existing in (final, tmp_path / "empty"):  # what the old job met on a resubmission
        existing.mkdir(exist_ok=True)
        with pytest.raises(FileExistsError, match="HF checkpoint already exists"):
            convert_dcp_to_hf(str(step / "policy" / "weights"), str(existing), str(tiny_rm_dir), str(tiny_rm_dir))


# ---- finding 2: rl_export / dpo_export run NeMo-RL's Megatron converter where megatron.bridge imports ----

def test_megatron_converter_runs_in_the_images_mcore_environment(monkeypatch, tmp_path):
    """convert_megatron_to_hf.py imports megatron.bridge and says it needs `uv run --extra mcore`; the image's
    default venv is synced without that extra. The image's frozen Megatron environment has it: NeMo-RL's own
    prefetch_venvs.create_frozen_environment_symlinks (run here, with the venv builder stubbed: it calls uv)
    writes `python-<Worker>` launchers, and the Megatron policy worker's venv is the `--extra mcore` one."""
    root = on_path(monkeypatch, "nemo_rl", "git")
    header = (root / "examples" / "converters" / "convert_megatron_to_hf.py").read_text()
    assert "from nemo_rl.models.megatron.community_import import export_model_from_megatron" in header
    assert "uv run --extra mcore python examples/converters/convert_megatron_to_hf.py" in header
    assert "from megatron.bridge import AutoBridge" in (root / "nemo_rl" / "models" / "megatron" / "community_import.py").read_text()
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    syncs = [line.strip() for line in dockerfile.splitlines() if line.strip().startswith("uv sync")]
    assert "--extra mcore" not in syncs[-1] and "--all-groups" in syncs[-1]  # the default venv, as the image leaves it
    assert "ENV NRL_CONTAINER=1" in dockerfile and "uv run nemo_rl/utils/prefetch_venvs.py" in dockerfile
    assert 'ENV PATH="/opt/nemo_rl_venv/bin:$PATH"' in dockerfile  # plain `python`: the default venv

    from nemo_rl.distributed.ray_actor_environment_registry import ACTOR_ENVIRONMENT_REGISTRY
    from nemo_rl.distributed.virtual_cluster import PY_EXECUTABLES
    from nemo_rl.utils import prefetch_venvs

    created = {}
    monkeypatch.setenv("NRL_CONTAINER", "1")
    monkeypatch.setattr(prefetch_venvs, "create_local_venv",
                        lambda py_executable, fqn: created.setdefault(fqn, f"/opt/ray_venvs/{fqn}/bin/python"))
    bin_dir = tmp_path / "usr-local-bin"
    bin_dir.mkdir()
    real_path = prefetch_venvs.Path
    monkeypatch.setattr(prefetch_venvs, "Path", lambda p, *a: real_path(str(bin_dir) if str(p) == "/usr/local/bin" else p, *a))
    configs: dict[str, list[str]] = {}
    for fqn, executable in ACTOR_ENVIRONMENT_REGISTRY.items():
        if executable.startswith("uv"):
            configs.setdefault(executable, []).append(fqn)
    prefetch_venvs.create_frozen_environment_symlinks(configs)

    step = tmp_path / "rl" / "checkpoints" / "step_3"
    (step / "policy" / "weights" / "iter_0000002").mkdir(parents=True)
    (step / "config.yaml").write_text(yaml.safe_dump({"policy": {"megatron_cfg": {"enabled": True}}}))
    command = convert.converter_command(step, tmp_path / "final", root / "examples" / "converters")
    launcher = bin_dir / command[0]
    assert launcher.is_file(), sorted(p.name for p in bin_dir.iterdir())
    worker = "nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker"
    assert ACTOR_ENVIRONMENT_REGISTRY[worker] == PY_EXECUTABLES.MCORE and "--extra mcore" in PY_EXECUTABLES.MCORE
    assert f'VENV_PATH="/opt/ray_venvs/{worker}"' in launcher.read_text()
    assert command[1:] == [str(root / "examples" / "converters" / "convert_megatron_to_hf.py"), "--config",
                           str(step / "config.yaml"), "--megatron-ckpt-path", str(step / "policy" / "weights" / "iter_0000002"),
                           "--hf-ckpt-path", str(tmp_path / "final")]
    # the DTensor converter needs no Megatron: the default python
    (step / "config.yaml").write_text(yaml.safe_dump({"policy": {"megatron_cfg": {"enabled": False}}}))
    assert convert.converter_command(step, tmp_path / "final", Path("/c"))[0] == "python"


def test_an_export_of_a_stage_carries_that_stages_training_record(nemo_rl_rm_checkpoint, tmp_path):
    """rm/final exported from NeMo-RL's checkpoints gets the hs3_training.json an engine=hf rm/final has,
    made from the rm stage's own config.yaml beside its checkpoints: the splits it trained on (over the
    lineage: sft/final's record), the data manifest, dtype and seq_len, the inputs' fingerprints. The eval's
    held-out check, lineage check and load settings read it (they saw nothing for a Megatron checkpoint)."""
    import shutil

    from eval.data import training_record
    from recipes.config import to_yaml

    nemo_rl = source("nemo_rl", "git")
    run_dir = tmp_path / "run"
    sft_final = run_dir / "sft" / "final"  # what sft_export wrote before (with its own record)
    sft_final.mkdir(parents=True)
    (sft_final / "hs3_training.json").write_text(json.dumps({"stage": "sft", "trained_on": ["edit/train"]}))
    (run_dir / "data").mkdir()
    (run_dir / "data" / "manifest.json").write_text('{"source": "tests"}')
    rm_cfg = compose("rm", ["engine=megatron", f"run_dir={run_dir}", "train.seq_len=4096", "model.dtype=bfloat16"])
    (run_dir / "rm").mkdir()
    (run_dir / "rm" / "config.yaml").write_text(to_yaml(rm_cfg))  # as the rm job's render wrote it
    shutil.copytree(nemo_rl_rm_checkpoint, run_dir / "rm" / "checkpoints")
    cfg = compose("convert", ["engine=megatron", f"run_dir={run_dir}", "name=rm_export", "out=${run_dir}/rm_export",
                              "megatron.convert_direction=nemo_rl_to_hf", "init=${run_dir}/rm/checkpoints",
                              "megatron.convert_dest=${run_dir}/rm/final", f"megatron.nemo_rl_dir={nemo_rl}"])
    done = run_job(cfg, {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{nemo_rl}"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = training_record(str(run_dir / "rm" / "final"))
    assert record["stage"] == "rm" and record["engine"] == "megatron"
    assert record["trained_on"] == ["edit/train", "edit_quality/train"]  # sft's lineage, then rm's own split
    assert (record["dtype"], record["seq_len"]) == ("bfloat16", 4096)
    assert record["data_manifest_sha256"] and record["exported_from"] == str((run_dir / "rm" / "checkpoints").resolve())
    assert json.loads((run_dir / "rm_export" / "summary.json").read_text())["training_record"] is True
    assert is_finished(cfg)  # the record is part of what the destination's fingerprint covers
