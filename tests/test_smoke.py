"""`./launch.sh smoke` end to end, as a user runs it: data -> sft -> rm -> rl -> eval on CPU."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO_ROOT

STAGES = ("data", "sft", "rm", "rl", "eval", "its")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_pipeline_runs_every_stage_and_prints_the_table():
    proc = subprocess.run([str(REPO_ROOT / "launch.sh"), "smoke"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = REPO_ROOT / "runs" / "smoke"

    summaries = {s: json.loads((run_dir / s / "summary.json").read_text()) for s in STAGES}
    for stage, summary in summaries.items():
        assert summary["stage"] == stage and isinstance(summary["value"], (int, float)), summary
    for name in ("sft", "pairs", "prompts"):
        assert (run_dir / "data" / name / "train.jsonl").stat().st_size > 0
    for stage, architecture in (("sft", "LlamaForCausalLM"), ("rm", "LlamaForSequenceClassification"),
                                ("rl", "LlamaForCausalLM")):
        final = run_dir / stage / "final"
        assert json.loads((final / "config.json").read_text())["architectures"] == [architecture]
        assert (final / "tokenizer.json").is_file() and (stage_dir := run_dir / stage / "config.yaml").is_file(), stage_dir
        assert any((run_dir / stage).glob("checkpoint-*")), f"{stage}: no checkpoint"
    lineage = json.loads((run_dir / "rl" / "final" / "hs3_training.json").read_text())
    assert lineage["trained_on"] == ["edit/train", "edit_quality/train"]
    assert lineage["init"].endswith("sft/final")
    assert 0.0 <= summaries["rm"]["value"] <= 1.0 and 0.0 <= summaries["rl"]["copy_rate"] <= 1.0
    assert (run_dir / "eval" / "report.json").is_file()
    its = [json.loads(line) for line in (run_dir / "its" / "results.jsonl").read_text().splitlines()]
    assert len(its) == 4 and all(len(r["candidates"]) == 2 and r["final"] for r in its)
    assert "mean nothing" in summaries["its"]["notes"][0]
    assert summaries["its"]["metric"] == "select_score_gain (proxy)" and summaries["its"]["select_score"]["is_proxy"]

    # the closing table: one row per stage with its wall time, key metric and output dir
    table = proc.stderr[proc.stderr.index("pipeline summary"):]
    for stage in STAGES:
        row = next(line for line in table.splitlines() if line.strip("│┃ ").startswith(stage + " "))
        assert f"runs/smoke/{stage}" in row and " s " in row and summaries[stage]["metric"] in row, row
