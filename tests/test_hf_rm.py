"""rm on the HF engine: Bradley-Terry on both pair kinds, exact per-kind accuracy, best checkpoint kept."""
from __future__ import annotations

import json

from recipes import rm
from recipes.config import compose
from recipes.io import read_jsonl


def test_reward_model_learns_a_hand_made_preference(edit_data_dir, tmp_path):
    """The hand-made pairs prefer a detailed edit over a bad edit and over the short original; a few
    steps of Bradley-Terry learn it, and the accuracy is measured per kind on held-out pairs."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = compose("rm", [f"run_dir={tmp_path}", f"data={edit_data_dir}", "train.save_steps=2",
                         "train.eval_steps=2", "train.save_total_limit=1"])
    summary = rm.run(cfg)

    assert summary["metric"] == "val_accuracy" and summary["value"] == 1.0
    assert summary["val_accuracy_good_vs_bad"] == 1.0 and summary["val_accuracy_good_vs_original"] == 1.0
    final = tmp_path / "rm" / "final"
    config = AutoConfig.from_pretrained(final)
    assert config.num_labels == 1 and config.architectures == ["LlamaForSequenceClassification"]

    # The best checkpoint (lowest validation loss) is the one kept and saved as final/.
    state = json.loads((tmp_path / "rm" / f"checkpoint-{summary['steps']}" / "trainer_state.json").read_text())
    evals = [(e["eval_loss"], e["step"]) for e in state["log_history"] if "eval_loss" in e]
    assert summary["best_checkpoint"].endswith(f"checkpoint-{min(evals)[1]}")

    # Swapping chosen and rejected must give the complementary accuracy: the metric is not constant.
    model = AutoModelForSequenceClassification.from_pretrained(final)
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]}
               for p in read_jsonl(edit_data_dir / "pairs" / "validation.jsonl")]
    accuracy = rm.pair_accuracy(model, rm.training.load_tokenizer(cfg, str(final)), swapped)
    assert accuracy == {"all": 0.0, "good_vs_bad": 0.0, "good_vs_original": 0.0}
    record = json.loads((final / "hs3_training.json").read_text())
    assert record["stage"] == "rm" and record["trained_on"] == ["edit_quality/train"]


def test_the_new_score_head_is_the_same_for_the_same_seed(tmp_path):
    """The base checkpoint has no score head: it is initialised at load time, so it must come from the
    configured seed (the same config gives the same reward model), and a new seed must change it."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from recipes import training

    heads = [training.load_model(compose("rm", [f"run_dir={tmp_path}", f"seed={seed}"]),
                                 AutoModelForSequenceClassification, num_labels=1).score.weight.detach().clone()
             for seed in (7, 7, 8)]
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)
    assert not torch.equal(heads[0], heads[2])
