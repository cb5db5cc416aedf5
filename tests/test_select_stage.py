"""select on the HF engine: the scaled Bradley-Terry loss (each pair's loss times its weight) through the
real trainer, and the stage end to end on the sample's preference rows."""
from __future__ import annotations

import json

import pytest

from data_prep.build import Options, build
from recipes import select
from recipes.config import compose
from tests.conftest import SAMPLE_DIR


@pytest.fixture(scope="module")
def select_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("select") / "data"
    build(str(SAMPLE_DIR), out, options=Options(subsets="preference"), progress=False)
    return out


def batch_and_trainer(select_data, tmp_path, tiny_model_dir):
    cfg = compose("select", [f"run_dir={tmp_path}", f"data={select_data}", f"init={tiny_model_dir}",
                             "rm.selection_fraction=0", "rm.keep_best=false"])
    trainer = select.build_trainer(cfg)
    examples = [trainer.train_dataset[i] for i in range(4)]
    assert sorted({e["weight"] for e in examples}) != [1.0]  # the sample mixes strengths
    return trainer, examples


def test_loss_is_each_pairs_bt_loss_times_its_weight(select_data, tmp_path, tiny_model_dir):
    import torch
    import torch.nn.functional as F
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    trainer, examples = batch_and_trainer(select_data, tmp_path, tiny_model_dir)
    model = trainer.model
    model.train()

    def loss_and_grad(weights):
        batch = trainer.data_collator([{**e, "weight": w} for e, w in zip(examples, weights)])
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.item(), model.score.weight.grad.clone()

    weights = [e["weight"] for e in examples]
    with torch.no_grad():
        plain = DataCollatorForPreference(pad_token_id=trainer.processing_class.pad_token_id)(
            [{k: v for k, v in e.items() if k != "weight"} for e in examples])
        chosen, rejected = torch.chunk(model(**plain).logits.squeeze(-1), 2)
        per_pair = -F.logsigmoid(chosen - rejected)
    loss, grad = loss_and_grad(weights)
    assert loss == pytest.approx((torch.tensor(weights) * per_pair).mean().item(), rel=1e-5)

    # All weights 1: exactly TRL's own (unweighted) Bradley-Terry loss.
    ones, _ = loss_and_grad([1.0] * 4)
    with torch.no_grad():
        trl_loss = RewardTrainer.compute_loss(trainer, model, dict(plain)).item()
    assert ones == pytest.approx(trl_loss, rel=1e-5) and ones == pytest.approx(per_pair.mean().item(), rel=1e-5)
    assert loss != pytest.approx(ones, rel=1e-3)  # the weights change the loss

    # Gradient scales with the weights: doubling them doubles it; one pair alone gives w_0/4 of its own.
    double, grad_double = loss_and_grad([2 * w for w in weights])
    assert double == pytest.approx(2 * loss, rel=1e-5) and torch.allclose(grad_double, 2 * grad, rtol=1e-4, atol=1e-7)
    _, grad_first = loss_and_grad([weights[0], 0.0, 0.0, 0.0])
    _, grad_first_unit = loss_and_grad([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(grad_first, weights[0] * grad_first_unit, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grad_first, grad, rtol=1e-3)


def test_select_stage_end_to_end(select_data, tmp_path, tiny_model_dir):
    summary = select.run(compose("select", [f"run_dir={tmp_path}", f"data={select_data}", f"init={tiny_model_dir}",
                                            "train.save_steps=1", "train.eval_steps=1", "rm.selection_fraction=0.25"]))
    validation = [json.loads(line) for line in (select_data / "select" / "validation.jsonl").read_text().splitlines()]
    weights = {f"val_accuracy_weight_{p['weight']}" for p in validation}
    assert summary["metric"] == "val_accuracy" and 0 <= summary["value"] <= 1
    assert weights and weights <= set(summary)
    record = json.loads((tmp_path / "select" / "final" / "hs3_training.json").read_text())
    assert record["stage"] == "select" and record["trained_on"] == ["preference/train"]
    assert record["rm_selection"]["split"] == "preference/train" and summary["best_checkpoint"]


def test_missing_select_data_is_one_line(tmp_path):
    from tests.conftest import run_cli

    done = run_cli("-m", "launcher", "select", f"run_dir={tmp_path}", f"data={tmp_path / 'none'}")
    assert done.returncode == 2 and "select/train.jsonl" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_select_evaluation_cadence_comes_from_the_run_length(select_data, tmp_path, tiny_model_dir):
    """select is rm's trainer: with train.eval_steps/save_steps null (conf/stage/select.yaml) it measures its
    selection loss at least rm.min_evaluations times, whatever the preset's fixed cadence (tiny: 5 steps)."""
    from recipes import rm

    cfg = compose("select", [f"run_dir={tmp_path}", f"data={select_data}", f"init={tiny_model_dir}",
                             "rm.selection_fraction=0.25"])
    trainer = select.build_trainer(cfg)
    steps = rm.hf_optimizer_steps(cfg, len(trainer.train_dataset))
    assert trainer.args.eval_steps == trainer.args.save_steps == max(1, steps // 4)
    assert steps // trainer.args.eval_steps >= min(4, steps)
    assert trainer.selection["eval_steps"] == trainer.args.eval_steps
