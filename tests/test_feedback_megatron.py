"""The Feedback model on engine=megatron: sft's Megatron-Bridge render reading feedback/ (a probe of what
the job receives: the rendered files; only a GPU cluster runs Megatron-Bridge itself), its 70B plan, and
select's answer on engine=megatron (HF engine only: NeMo-RL v0.7.0 has no per-pair weight)."""
from __future__ import annotations

import yaml

from data_prep.build import Options, build
from recipes.config import compose
from recipes import feedback
from recipes.megatron import bridge_sft
from tests.conftest import SAMPLE_DIR, run_cli


def test_feedback_renders_sfts_job_on_feedback_rows(tmp_path):
    data = tmp_path / "data"
    build(str(SAMPLE_DIR), data, options=Options(subsets="edit,feedback"), progress=False)
    args = ["engine=megatron", "model=llama33_70b", f"data={data}", "dry_run=true"]
    fb = compose("feedback", [f"run_dir={tmp_path / 'f'}", *args])
    feedback.run_megatron(fb)
    rendered = yaml.safe_load((tmp_path / "f" / "feedback" / "megatron_bridge_sft.yaml").read_text())
    text = (tmp_path / "f" / "feedback" / "megatron_bridge_sft.yaml").read_text()
    assert f"train: {(data / 'feedback' / 'train.jsonl').resolve()}" in text
    assert f"validation: {(data / 'feedback' / 'validation.jsonl').resolve()}" in text
    assert "/sft/train.jsonl" not in text

    # The same plan and overrides as the Edit sft (the model file's stages.feedback = stages.sft).
    sft = compose("sft", [f"run_dir={tmp_path / 's'}", *args])
    bridge_sft.run(sft)
    edit = yaml.safe_load((tmp_path / "s" / "sft" / "megatron_bridge_sft.yaml").read_text())

    def shape(doc):
        return [o for o in doc["overrides"] if not any(k in o for k in ("checkpoint.", "tensorboard_dir", "train_iters"))]

    assert shape(rendered) == shape(edit)
    assert any(o == "model.tensor_model_parallel_size=8" for o in rendered["overrides"])


def test_feedback_plan_and_select_on_megatron(tmp_path):
    plan = run_cli("-m", "launcher", "plan", "stage=feedback", "model=llama33_70b", f"data={tmp_path}")
    assert plan.returncode == 0 and "plan TP8 PP4" in plan.stdout and "valid" in plan.stdout
    select = run_cli("-m", "launcher", "select", "engine=megatron", f"run_dir={tmp_path}")
    assert select.returncode == 2 and "no megatron engine" in select.stderr


def test_feedback_on_megatron_submits_through_slurm(tmp_path):
    """executor=slurm goes through recipes.megatron.build_command: the job runs bridge_sft (one task per
    GPU) with the config rendered on feedback/ rows, not the Edit sft's."""
    run_dir = tmp_path / "run"
    proc = run_cli("-m", "launcher", "feedback", "engine=megatron", "executor=slurm", "cluster=example",
                   f"run_dir={run_dir}", "--dry-run", env={"HF_TOKEN": "probe-token"})
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout  # a dry run prints the batch script it would submit
    config = run_dir / "feedback" / "megatron_bridge_sft.yaml"
    assert f"python -m recipes.megatron.bridge_sft --config {config}" in script
    assert "--ntasks-per-node=8" in script
    text = config.read_text()
    assert f"train: {run_dir.resolve()}/data/feedback/train.jsonl" in text and "/sft/train.jsonl" not in text
