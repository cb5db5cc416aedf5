"""rm on the HF engine: Bradley-Terry on both pair kinds, exact per-kind accuracy, best checkpoint kept."""
from __future__ import annotations

import json

import pytest

from recipes import rm
from recipes.config import compose
from hs3.io import read_jsonl


def test_reward_model_learns_a_hand_made_preference(edit_data_dir, tmp_path, tiny_model_dir):
    """The hand-made pairs prefer a detailed edit over a bad edit and over the short original; a few
    steps of Bradley-Terry learn it, and the accuracy is measured per kind on held-out pairs."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = compose("rm", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}", "train.save_steps=2",
                         "train.eval_steps=2", "train.save_total_limit=1", "rm.selection_fraction=0.25"])
    summary = rm.run(cfg)

    assert summary["metric"] == "val_accuracy" and summary["value"] == 1.0
    assert summary["val_accuracy_good_vs_bad"] == 1.0 and summary["val_accuracy_good_vs_original"] == 1.0
    final = tmp_path / "rm" / "final"
    config = AutoConfig.from_pretrained(final)
    assert config.num_labels == 1 and config.architectures == ["LlamaForSequenceClassification"]

    # The best checkpoint (lowest loss on the held-out slice of the train pairs) is kept as final/.
    state = json.loads((tmp_path / "rm" / f"checkpoint-{summary['steps']}" / "trainer_state.json").read_text())
    evals = [(e["eval_loss"], e["step"]) for e in state["log_history"] if "eval_loss" in e]
    assert summary["best_checkpoint"].endswith(f"checkpoint-{min(evals)[1]}")

    # Swapping chosen and rejected must give the complementary accuracy: the metric is not constant.
    model = AutoModelForSequenceClassification.from_pretrained(final)
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]}
               for p in read_jsonl(edit_data_dir / "pairs" / "validation.jsonl")]
    accuracy = rm.pair_accuracy(model, rm.training.load_tokenizer(cfg, str(final)), swapped, cfg.train.seq_len)
    assert accuracy == {"all": 0.0, "good_vs_bad": 0.0, "good_vs_original": 0.0}
    record = json.loads((final / "hs3_training.json").read_text())
    assert record["stage"] == "rm" and record["trained_on"] == ["edit_quality/train"]
    # Selection ran on 2 of the 8 distinct train prompts (4 pairs each), recorded in both places.
    selection = {"split": "edit_quality/train", "fraction": 0.25, "seed": cfg.seed, "prompts": 2, "pairs": 8,
                 "eval_steps": 2, "save_steps": 2}
    assert summary["selection"] == record["rm_selection"] == selection
    assert summary["skipped_too_long"] == {"train": 0} and summary["validation_pairs_truncated"] == 0


def test_selection_slice_is_held_out_of_training_and_seeded(edit_data_dir, tmp_path, tiny_model_dir):
    """keep_best selects on train pairs the model never trains on; pairs/validation is not in the
    trainer at all (it failed before: the trainer evaluated, and selected, on pairs/validation)."""
    pairs = rm.load_split(edit_data_dir / "pairs" / "train.jsonl")
    train, selection, counts = rm.selection_split(pairs, 0.25, 1)
    assert counts == {"prompts": 2, "pairs": 8} and len(train) + len(selection) == len(pairs)
    assert all(i.startswith("train-") for i in selection["id"]) and not set(train["id"]) & set(selection["id"])
    prompts = lambda ds: {json.dumps(p) for p in ds["prompt"]}  # noqa: E731
    assert not prompts(train) & prompts(selection)  # a prompt's pairs stay on one side
    assert rm.selection_split(pairs, 0.25, 1)[1]["id"] == selection["id"]  # seeded
    assert any(rm.selection_split(pairs, 0.25, seed)[1]["id"] != selection["id"] for seed in range(2, 6))

    cfg = compose("rm", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}", "seed=1",
                         "rm.selection_fraction=0.25"])
    trainer = rm.build_trainer(cfg)
    expected = rm.tokenize_pairs(selection, trainer.processing_class)
    assert trainer.eval_dataset["chosen_ids"] == expected["chosen_ids"]
    assert trainer.eval_dataset["rejected_ids"] == expected["rejected_ids"]
    assert len(trainer.train_dataset) == len(train)


def test_rm_defaults_to_the_sft_model_and_keep_best_needs_a_selection_slice(tmp_path):
    from recipes.config import ConfigError

    assert compose("rm", [f"run_dir={tmp_path}"]).init == f"{tmp_path}/sft/final"
    with pytest.raises(ConfigError, match="rm.selection_fraction > 0"):
        compose("rm", [f"run_dir={tmp_path}", "rm.selection_fraction=0"])
    assert compose("rm", [f"run_dir={tmp_path}", "rm.selection_fraction=0", "rm.keep_best=false"]).rm.selection_fraction == 0


def test_the_new_score_head_is_the_same_for_the_same_seed(tmp_path):
    """The base checkpoint has no score head: it is initialised at load time, so it must come from the
    configured seed (the same config gives the same reward model), and a new seed must change it."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from recipes import training

    heads = [training.load_model(compose("rm", [f"run_dir={tmp_path}", f"seed={seed}", "init=null"]),
                                 AutoModelForSequenceClassification, num_labels=1).score.weight.detach().clone()
             for seed in (7, 7, 8)]
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)
    assert not torch.equal(heads[0], heads[2])


def test_rm_pairs_over_seq_len_are_counted_not_dropped_silently(edit_data_dir, tmp_path, tiny_model_dir):
    """RewardTrainer drops pairs over max_length without a word (trl/trainer/reward_trainer.py:730-739);
    the rm stage skips them itself, counts them and gives TRL no max_length, so nothing else is dropped."""
    pairs = read_jsonl(edit_data_dir / "pairs" / "train.jsonl")
    tokenizer = rm.training.load_tokenizer(compose("rm", [f"run_dir={tmp_path}", f"init={tiny_model_dir}"]))
    n = lambda conv: len(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False))  # noqa: E731
    lengths = [max(n(p["prompt"] + p["chosen"]), n(p["prompt"] + p["rejected"])) for p in pairs]
    seq_len = sorted(lengths)[len(lengths) // 2]
    over = sum(length > seq_len for length in lengths)
    assert 0 < over < len(pairs)
    cfg = compose("rm", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                         f"train.seq_len={seq_len}", "rm.selection_fraction=0.25"])
    trainer = rm.build_trainer(cfg)
    assert trainer.args.max_length is None
    assert trainer.skipped_too_long == {"train": over}
    assert len(trainer.train_dataset) + len(trainer.eval_dataset) == len(pairs) - over
    assert all(len(r["chosen_ids"]) <= seq_len and len(r["rejected_ids"]) <= seq_len for r in trainer.train_dataset)


def test_rm_evaluates_at_least_min_evaluations_times_by_default(edit_data_dir, tmp_path, tiny_model_dir):
    """Issues 16 (finding 6) and 17 (item 9): with a fixed cadence (the tiny preset's 5 steps, the 70B's 50)
    a short run evaluated once or never, and keep_best silently kept the last step. Now the cadence comes
    from the run's length: 24 train pairs at global batch 4 = 6 steps -> every 6 // 4 = 1 step, and every
    evaluated step is saved. The real Trainer's log is counted."""
    cfg = compose("rm", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                         "rm.selection_fraction=0.25", "train.save_total_limit=1"])
    assert cfg.train.eval_steps is None and cfg.train.save_steps is None and cfg.rm.min_evaluations == 4
    trainer = rm.build_trainer(cfg)
    steps = rm.hf_optimizer_steps(cfg, len(trainer.train_dataset))
    assert steps == 6 and (trainer.args.eval_steps, trainer.args.save_steps) == (1, 1)
    trainer.train()
    evaluated = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert trainer.state.global_step == steps and len(evaluated) >= 4 and evaluated == list(range(1, steps + 1))
    assert trainer.state.best_model_checkpoint  # chosen among the evaluated, saved steps
    assert trainer.selection["eval_steps"] == 1

    # an explicit number wins (and a derived one never breaks keep_best's save/eval alignment)
    explicit = rm.build_trainer(compose("rm", [f"run_dir={tmp_path / 'x'}", f"data={edit_data_dir}",
                                               f"init={tiny_model_dir}", "rm.selection_fraction=0.25",
                                               "train.eval_steps=3"]))
    assert (explicit.args.eval_steps, explicit.args.save_steps) == (3, 3)
    # more steps, fewer evaluations per step: 4 epochs = 24 steps -> every 6 steps
    long_run = compose("rm", [f"run_dir={tmp_path}", "train.epochs=4", "rm.selection_fraction=0.25"])
    assert rm.evaluation_cadence(long_run, rm.hf_optimizer_steps(long_run, 24)) == (6, 6)
    assert rm.evaluation_cadence(compose("rm", [f"run_dir={tmp_path}", "rm.min_evaluations=8"]), 24) == (3, 3)
