"""The Feedback and Select evals (eval/feedback_eval.py, eval/select_eval.py): per-item metrics on
hand-made feedback, and both evals end to end through `python -m launcher eval` (dispatch on eval.task)."""
from __future__ import annotations

import json

import pytest

from data_prep.build import Options, build
from eval import feedback_eval, select_eval
from recipes.config import compose
from hs3.io import read_jsonl
from tests.conftest import SAMPLE_DIR, run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("fs") / "data"
    build(str(SAMPLE_DIR), out, options=Options(subsets="feedback,preference"), progress=False)
    return out


def test_annotators_level_is_the_lower_median():
    assert feedback_eval.annotators_level(["perfectly", "not", "mostly"]) == "mostly"
    assert feedback_eval.annotators_level(["perfectly", "slightly"]) == "slightly"
    assert feedback_eval.annotators_level(["partially"]) == "partially"
    assert feedback_eval.annotators_level([]) is None


def test_item_metrics_level_agreement_and_chrf():
    refs = ["The response is mostly helpful. It is correct but short.", "The response is perfectly helpful. Clear."]
    levels = ["mostly", "perfectly"]  # lower median: mostly
    exact = feedback_eval.item_metrics(refs[0], refs, levels)
    assert exact["format_adherence"] == 1.0 and exact["level_exact"] == 1.0 and exact["level_within_one"] == 1.0
    near = feedback_eval.item_metrics("The response is partially helpful. Meh.", refs, levels)
    assert near["level_exact"] == 0.0 and near["level_within_one"] == 1.0
    far = feedback_eval.item_metrics("The response is not helpful at all.", refs, levels)
    assert far["level_exact"] == 0.0 and far["level_within_one"] == 0.0
    bad = feedback_eval.item_metrics("Helpful response.", refs, levels)
    assert bad["format_adherence"] == 0.0 and bad["level_exact"] == 0.0 and bad["level_within_one"] == 0.0
    # chrF++ against several references keeps the best one: a copy of either scores 100.
    from eval.metrics import corpus_chrf

    assert corpus_chrf(feedback_eval.item_metrics(refs[1], refs, levels)["chrf"]) == pytest.approx(100.0)
    assert corpus_chrf(feedback_eval.item_metrics(refs[1], refs[:1], levels)["chrf"]) < 60


def test_feedback_eval_end_to_end(data, tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    done = run_cli("-m", "launcher", "eval", f"run_dir={tmp_path}", f"data={data}", f"init={tiny_model_dir}",
                   f"out={out}", "eval.task=feedback", "eval.max_new_tokens=4", "eval.bootstrap_samples=50")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    items = {(line["source"]["row"], line["source"]["response"]) for line in read_jsonl(data / "feedback" / "validation.jsonl")}
    assert report["task"] == "feedback" and report["counts"]["items"] == len(items)
    assert set(report["overall"]) == {"format_adherence", "level_exact", "level_within_one", "chrf"}
    assert all(len(s["ci"]) == 2 for s in report["overall"].values())
    generations = read_jsonl(out / "generations.jsonl")
    # The figures are the items' own: recompute one from the generations.
    adherence = sum(g["metrics"]["format_adherence"] for g in generations) / len(generations)
    assert report["overall"]["format_adherence"]["value"] == pytest.approx(adherence)
    assert json.loads((out / "summary.json").read_text())["metric"] == "level_exact"
    assert "Feedback model eval" in (out / "report.md").read_text()


def test_select_eval_accuracy_by_strength(data, tmp_path, tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification

    from recipes import reward
    from recipes.models import load_tokenizer

    cfg = compose("eval", [f"run_dir={tmp_path}", f"data={data}", f"init={tiny_rm_dir}", f"out={tmp_path / 'e'}",
                           "eval.task=select", "eval.bootstrap_samples=50"])
    summary = select_eval.run(cfg)
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    pairs = read_jsonl(data / "select" / "validation.jsonl")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    tokenizer = load_tokenizer(cfg.model, str(tiny_rm_dir))
    wins = [c > r for c, r in zip(reward.score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], 1024),
                                  reward.score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], 1024))]
    assert summary["value"] == pytest.approx(sum(wins) / len(wins))
    assert set(report["by_strength"]) == {f"strength_{p['weight']}" for p in pairs}
    weighted = sum(p["weight"] * w for p, w in zip(pairs, wins)) / sum(p["weight"] for p in pairs)
    assert report["overall"]["weighted_accuracy"]["value"] == pytest.approx(weighted)


def test_select_eval_places_the_model_as_the_other_evals_do(data, tmp_path, tiny_rm_dir, monkeypatch):
    """The Select model loads with eval.engines.gpu_device_map()'s placement ("auto" over the GPUs; None on a
    CPU), as the reward scorers do (before, a 70B Select model was loaded without one, on the CPU). A CPU
    model carries no record of its map, so the map given to from_pretrained is what is checked."""
    from recipes import models

    placement = {"": "cpu"}
    monkeypatch.setattr(select_eval, "gpu_device_map", lambda: placement)
    seen = []
    real = models.load_pretrained

    def spy(auto_class, source, **kwargs):
        seen.append((auto_class.__name__, kwargs.get("device_map")))
        return real(auto_class, source, **kwargs)

    monkeypatch.setattr(models, "load_pretrained", spy)
    cfg = compose("eval", [f"run_dir={tmp_path}", f"data={data}", f"init={tiny_rm_dir}", f"out={tmp_path / 'e'}",
                           "eval.task=select", "eval.bootstrap_samples=50"])
    select_eval.run(cfg)
    assert ("AutoModelForSequenceClassification", placement) in seen, seen


def test_select_eval_refuses_a_model_trained_on_the_split(data, tmp_path, tiny_rm_dir):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_rm_dir, model)
    (model / "hs3_training.json").write_text(json.dumps({"stage": "select", "trained_on": ["preference/validation"]}))
    done = run_cli("-m", "launcher", "eval", f"run_dir={tmp_path}", f"data={data}", f"init={model}", f"out={tmp_path / 'e'}")
    assert done.returncode == 2 and "preference/validation" in done.stderr  # eval.task=auto found `select`
