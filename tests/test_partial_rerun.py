"""Partial reruns of a pipeline (issue 19 item 5): from=, only=, base_run=, and the refusal of changed
settings in an existing run dir, on the CPU smoke experiment (conf/examples/cpu_smoke.yaml)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher.pipeline import LINKS_FILE, pipeline_options, selected, stage_args

from .conftest import REPO_ROOT, run_cli

EXAMPLE = str(REPO_ROOT / "conf" / "examples" / "cpu_smoke.yaml")
# The smoke experiment, shorter still: a few steps per stage, 2 eval rows.
SHORT = ["sft:train.max_steps=3", "rm:train.max_steps=2", "rl:train.max_steps=2", "eval:eval.max_rows=2",
         "eval:eval.policy_likelihood=false"]


def pipeline(run_dir, *args, timeout=1200):
    return run_cli("-m", "launcher", "pipeline", "--config", EXAMPLE, f"run_dir={run_dir}", *SHORT, *args, timeout=timeout)


def mtimes(root: Path) -> dict[str, int]:
    """Every file under root (links followed: what a linked stage holds) -> mtime."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


# ---- fast: the options themselves ---------------------------------------------------------------

def test_from_and_only_select_entries():
    chain, _, _ = stage_args("default", [])
    assert selected(chain, {"from": "rl"}) == ["rl", "eval"]
    assert selected(chain, {"only": "eval,sft"}) == ["sft", "eval"]
    assert selected(chain, {}) == ["data", "sft", "rm", "rl", "eval"]
    with pytest.raises(Exception, match=r"from=rll: not an entry of the chain \(did you mean rl\?\)"):
        selected(chain, {"from": "rll"})
    with pytest.raises(Exception, match="from= and only= together"):
        pipeline_options(["from=rl", "only=eval"])
    options, rest = pipeline_options(["base_run=runs/a", "run_dir=runs/b", "rl:rl.k=2"])
    assert options == {"base_run": "runs/a"} and rest == ["run_dir=runs/b", "rl:rl.k=2"]  # never reaches compose


@pytest.mark.parametrize("args, message", [
    (["base_run={tmp}/nope"], "base_run={tmp}/nope: no such run dir"),
    (["base_run={tmp}/run"], "is this run's run_dir"),
    (["only=eval"], "eval needs rl, which is not finished in {tmp}/run"),
])
def test_bad_partial_runs_are_one_line_errors(tmp_path, args, message):
    (tmp_path / "run").mkdir()
    proc = pipeline(tmp_path / "run", *[a.format(tmp=tmp_path) for a in args], timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert message.format(tmp=tmp_path) in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # nothing ran, nothing written


def test_a_link_the_pipeline_did_not_make_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "sft").symlink_to(elsewhere)
    proc = pipeline(tmp_path / "run", "--dry-run", timeout=300)
    assert proc.returncode == 2 and "is a symbolic link this pipeline did not make" in proc.stderr, proc.stderr[-2000:]


# ---- slow: on a real run --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("partial") / "a"
    proc = pipeline(run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.mark.slow
def test_a_changed_setting_is_refused_before_anything_runs_with_the_way_out(base_run):
    before = mtimes(base_run)
    rerun = pipeline(base_run)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in ("data", "sft", "rm", "rl", "eval"):
        assert f"{name}: finished earlier with the same config, skipped" in rerun.stderr
    changed = pipeline(base_run, "rl:rl.kl_coef=0.1")
    assert changed.returncode == 2, changed.stderr[-3000:]
    last = changed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rl: ") and "rl.kl_coef: 0.05 -> 0.1" in last
    assert f"run_dir=NEW_DIR base_run={base_run}" in last and "Rerun the same command" not in changed.stderr
    assert mtimes(base_run) == before


@pytest.mark.slow
def test_only_and_from_in_a_finished_run(base_run, tmp_path):
    run = tmp_path / "c"
    proc = pipeline(run, f"base_run={base_run}", "only=eval", "eval:eval.max_rows=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.is_symlink()) == ["data", "rl", "rm", "sft"]
    assert json.loads((run / "eval" / "report.json").read_text())["counts"]["rows"] == 1
    before = mtimes(run)
    rerun = pipeline(run, "from=rl", "eval:eval.max_rows=1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rl: linked from" in rerun.stderr and "eval: finished earlier with the same config, skipped" in rerun.stderr
    assert mtimes(run) == before and os.path.islink(run / "rl")
    changed = pipeline(run, "from=eval", "eval:eval.max_rows=2", "--dry-run")  # the changed eval, only that
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "# eval: python -m launcher eval" in changed.stdout and "# rl: not run (linked from" in changed.stdout


@pytest.mark.slow
def test_base_run_links_the_unchanged_stages_and_runs_the_rest(base_run, tmp_path):
    before = mtimes(base_run)
    new = tmp_path / "b"
    dry = pipeline(new, f"base_run={base_run}", "rl:rl.kl_coef=0.1", "--dry-run")
    assert dry.returncode == 0 and not new.exists(), dry.stderr[-2000:]  # a dry run writes nothing
    assert f"rm: would link {new}/rm -> {base_run}/rm" in dry.stdout

    proc = pipeline(new, f"base_run={base_run}", "rl:rl.kl_coef=0.1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("data", "sft", "rm"):
        assert (new / name).is_symlink() and (new / name).resolve() == (base_run / name).resolve()
    for name in ("rl", "eval"):
        assert (new / name).is_dir() and not (new / name).is_symlink()
    assert "rl: not linked from" in proc.stderr and "its settings differ" in proc.stderr
    links = json.loads((new / LINKS_FILE).read_text())
    assert links["base_run"] == str(base_run.resolve()) and sorted(links["entries"]) == ["data", "rm", "sft"]
    assert links["entries"]["rm"]["inputs_checked"] and links["entries"]["sft"]["final_fingerprint"]
    record = json.loads((new / "rl" / "final" / "hs3_training.json").read_text())
    assert record["init"] == f"{new}/sft/final"
    assert "kl_coef: 0.1" in (new / "rl" / "config.yaml").read_text()
    assert mtimes(base_run) == before  # the base run is only read

    again = pipeline(new, f"base_run={base_run}", "rl:rl.kl_coef=0.1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"rm: linked from {base_run.resolve()}/rm" in again.stderr
    assert "rl: finished earlier with the same config, skipped" in again.stderr

    # (last: it changes the base run) a linked stage that changed in the base run is no longer trusted: its link goes, it runs here
    weights = base_run / "rm" / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)
    weights.write_bytes(bytes(data))
    stale = pipeline(new, f"base_run={base_run}", "rl:rl.kl_coef=0.1", "--dry-run")
    assert stale.returncode == 0, stale.stderr[-2000:]
    assert f"rm: would remove the link {new}/rm (unlinked: its final fingerprint changed since it was linked)" in stale.stdout
    assert (new / "rm").is_symlink()  # dry run: still there
