"""The local pipeline: a failed stage stops the ones after it, and a rerun picks up where it stopped."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from launcher import stages
from recipes import config

from launcher.pipeline import split_args, stage_args
from launcher.stages import load_preset

from .conftest import run_cli

PIPELINE_STAGES = ("data", "sft", "rm", "rl", "eval")


def smoke_args(run_dir) -> list[str]:
    """The smoke preset's settings as command-line args of `./launch.sh pipeline` (NAME:key=value), for the
    default chain's entries (the smoke chain's extra its entry is not one of them)."""
    common, chain = load_preset("smoke")
    args = [a for a in common if not a.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    return args + [f"{name}:{arg}" for name, entry in chain.items() if name in PIPELINE_STAGES for arg in entry.args]


def test_stage_args_split_by_prefix():
    common, per_stage, dry_run, preset = split_args(["model=tiny", "sft:train.lr=0.5", "rl:rl.k=2", "--dry-run"],
                                                    PIPELINE_STAGES)
    assert common == ["model=tiny"] and dry_run and preset is None
    assert per_stage["sft"] == ["train.lr=0.5"] and per_stage["rl"] == ["rl.k=2"] and per_stage["rm"] == []


def test_default_chain_comes_from_the_preset_file(tmp_path, monkeypatch):
    """The stage list and the afterok graph are the preset's: a preset with one more entry (a second
    convert) runs it, in its own dir, with its own args, after the entries it needs."""
    chain, args, _ = stage_args("default", ["run_dir=" + str(tmp_path)])
    assert list(chain) == list(PIPELINE_STAGES)
    assert {n: e.needs for n, e in chain.items()} == {"data": (), "sft": ("data",), "rm": ("sft",),
                                                        "rl": ("sft", "rm"), "eval": ("rl",)}
    conf = tmp_path / "conf"
    (conf / "pipeline").mkdir(parents=True)
    (conf / "pipeline" / "two.yaml").write_text(
        "args: [model=tiny]\nchain:\n  data: {}\n  sft: {needs: [data]}\n"
        "  sft_export: {stage: convert, needs: [sft], args: [megatron.convert_direction=megatron_to_hf]}\n")
    monkeypatch.setattr(stages, "CONF_DIR", conf)
    chain, args, _ = stage_args("two", [f"run_dir={tmp_path}", "sft_export:init=/ckpt"])
    assert chain["sft_export"].stage == "convert" and chain["sft_export"].needs == ("sft",)
    cfg = config.compose("convert", args["sft_export"])
    assert cfg.name == "sft_export" and cfg.out == f"{tmp_path}/sft_export" and cfg.init == "/ckpt"
    assert cfg.megatron.convert_direction == "megatron_to_hf"
    assert config.compose("sft", args["sft"]).out == f"{tmp_path}/sft"


@pytest.mark.parametrize("body, message", [
    ("chain:\n  sft: {needs: [data]}\n", "chain.sft needs 'data', which is not an earlier entry of the chain"),
    ("chain:\n  x: {stage: sfft}\n", "chain.x: unknown stage 'sfft'"),
    ("stages: {}\n", "unknown key(s) stages"),
])
def test_bad_preset_is_one_line_error(tmp_path, monkeypatch, body, message):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "bad.yaml").write_text(body)
    monkeypatch.setattr(stages, "CONF_DIR", tmp_path)
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        load_preset("bad")


def test_engine_megatron_selects_the_megatron_chain():
    chain, args, _ = stage_args("default", ["engine=megatron"])
    assert list(chain)[:2] == ["data", "import"] and "sft_export" in chain and "rl_export" in chain
    chain, _, _ = stage_args("default", ["engine=megatron", "preset=default"])
    assert list(chain) == list(PIPELINE_STAGES)


def test_slurm_does_not_import_the_pipeline():
    """The pipeline decides which entries run and hands them to launcher/slurm.py, never the reverse: no
    import of launcher.pipeline anywhere in slurm.py, at module level or inside a function."""
    import ast

    tree = ast.parse((Path(config.REPO_ROOT) / "launcher" / "slurm.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}
    assert any(name.startswith("launcher.") for name in imported), imported  # the walk sees its launcher imports
    assert not [name for name in imported if name == "launcher.pipeline" or name.startswith("launcher.pipeline.")]


def test_unknown_stage_prefix_is_one_line_error():
    proc = run_cli("-m", "launcher", "pipeline", "sfft:train.lr=0.5", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: 'sfft:train.lr=0.5': 'sfft' is not a pipeline stage (did you mean sft?) "
                                   "(data, sft, rm, rl, eval)")


@pytest.mark.slow
def test_failed_stage_stops_the_pipeline_and_a_rerun_resumes_there(tmp_path):
    args = smoke_args(tmp_path)
    failed = run_cli("-m", "launcher", "pipeline", *args, f"rl:rm={tmp_path}/no_such_rm", timeout=900)
    assert failed.returncode == 2
    # a stage's own one-line error (exit 2): rerunning as is would repeat it, so the advice is to fix it
    assert ("error: stage rl failed (exit 2: the error above); later stages not run. Fix what it says and rerun: "
            "the finished stages are skipped.") in failed.stderr
    assert "Rerun the same command" not in failed.stderr
    assert f"reward_model={tmp_path}/no_such_rm: no model there" in failed.stderr  # the stage's own one line
    done = {stage for stage in PIPELINE_STAGES if (tmp_path / stage / "summary.json").is_file()}
    assert done == {"data", "sft", "rm"}
    sft_weights = (tmp_path / "sft" / "final" / "model.safetensors").stat().st_mtime_ns

    rerun = run_cli("-m", "launcher", "pipeline", *args, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for stage in ("data", "sft", "rm"):
        assert f"{stage}: finished earlier with the same config, skipped" in rerun.stderr
    assert (tmp_path / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_weights  # not retrained
    assert json.loads((tmp_path / "rl" / "summary.json").read_text())["stage"] == "rl"
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert {"copy_rate", "proxy_reward_win_rate", "chrf", "rouge_l", "rm_accuracy"} <= set(report)
    assert "pipeline summary" in rerun.stderr and "(skipped)" in rerun.stderr


def test_a_megatron_stage_rendered_for_slurm_counts_as_finished_for_its_job(tmp_path):
    """The Megatron engine renders config.yaml at submission (executor=slurm); when the job has written
    summary.json, resubmitting the chain must not run it again (is_finished(job_config(cfg)))."""
    import json

    from recipes.config import compose
    from recipes.megatron import build_command
    from launcher.slurm import job_config
    from launcher.stages import is_finished

    cfg = compose("sft", ["engine=megatron", "executor=slurm", "cluster=example", f"run_dir={tmp_path}"])
    build_command(cfg)  # what submission renders into OUT
    assert "executor: slurm" in (Path(cfg.out) / "config.yaml").read_text()
    assert not is_finished(job_config(cfg))  # no summary yet
    (Path(cfg.out) / "summary.json").write_text(json.dumps({"stage": "sft"}))
    assert is_finished(job_config(cfg))
    changed = compose("sft", ["engine=megatron", "executor=slurm", "cluster=example", f"run_dir={tmp_path}", "train.lr=3e-6"])
    assert not is_finished(job_config(changed))
