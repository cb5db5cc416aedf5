"""select: the Select model, a scaled Bradley-Terry reward model on the preference subset.

    python -m recipes select [key=value ...]        (./launch.sh select ...)

Reads  DATA/select/{train,validation}.jsonl   (python -m data_prep --subsets ...,preference): pairs
       {"id", "prompt": context, "chosen", "rejected", "weight": |overall_preference| in 1..3, ...}
       (data_prep/select_data.py; ties were rejected there).
Writes OUT/checkpoint-N/, OUT/final/ (sequence classification, one output, + tokenizer),
       final/hs3_training.json (trained_on: preference/train), OUT/summary.json (accuracy on
       select/validation, overall and per weight).

Loss (scaled BT, HelpSteer2-Preference, arXiv 2410.01257): each pair's Bradley-Terry loss multiplied
by its preference strength, averaged over the batch:
    L = mean_i( w_i * -log sigmoid(r(prompt_i + chosen_i) - r(prompt_i + rejected_i)) ).
TRL's RewardTrainer (trl 1.16, trl/trainer/reward_trainer.py:788-792) knows only an additive `margin`
inside the sigmoid, -log sigmoid(r_c - r_r - m) (Llama-2's margin loss), which is another loss; so
ScaledBTTrainer below carries a `weight` column through the collator and overrides compute_loss.

The rest is rm's (recipes/rm.py): the score is recipes.reward's (whole conversation rendered by the
chat template, read at its end-of-turn token), rm.selection_fraction of the train pairs (seeded) are
held out to pick the best checkpoint by their (weighted) loss (rm.keep_best), train pairs longer than
train.seq_len are skipped and counted. The Select model card says its input is the context and the
response (no edit request), one float out, and that it may not work well past 4,096 tokens.
"""
from __future__ import annotations

import time
from collections import defaultdict

from recipes import reward, rm, training

SPLIT_DIR = "select"
TRAINED_ON = ["preference/train"]


def scaled_bt_loss(rewards_chosen, rewards_rejected, weight):
    """mean(weight * -log sigmoid(r_chosen - r_rejected)), the scaled Bradley-Terry loss."""
    import torch.nn.functional as F

    return (weight * -F.logsigmoid(rewards_chosen - rewards_rejected)).mean()


def trainer_classes():
    """(ScaledBTTrainer, WeightedPreferenceCollator), defined on first use so importing this module
    stays light (no torch, no trl)."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class WeightedPreferenceCollator(DataCollatorForPreference):
        """TRL's preference collator (chosen rows, then rejected rows, right-padded) plus `weight`."""

        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float)
            return batch

    class ScaledBTTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:  # keep `weight` when unused columns are removed
                self._signature_columns = ["chosen_ids", "rejected_ids", "weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            weight = inputs.pop("weight")
            inputs["use_cache"] = False
            outputs = model(**inputs)
            rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = scaled_bt_loss(rewards_chosen, rewards_rejected, weight.to(rewards_chosen.dtype))
            if self.args.center_rewards_coefficient is not None:
                loss += self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
            with torch.no_grad():
                accuracy = (rewards_chosen > rewards_rejected).float().mean()
                self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
                margin = (rewards_chosen - rewards_rejected).mean()
                self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
            return (loss, outputs) if return_outputs else loss

    return ScaledBTTrainer, WeightedPreferenceCollator


def tokenize_pairs(dataset, tokenizer):
    """(chosen_ids, rejected_ids, weight): reward_input_ids of each side, the pair's weight kept."""
    def ids(row):
        return {"chosen_ids": reward.reward_input_ids(tokenizer, row["prompt"] + row["chosen"]),
                "rejected_ids": reward.reward_input_ids(tokenizer, row["prompt"] + row["rejected"]),
                "weight": float(row["weight"])}

    return dataset.map(ids, remove_columns=dataset.column_names)


def build_trainer(cfg):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig

    train_file = training.data_file(cfg, f"{SPLIT_DIR}/train.jsonl")
    training.data_file(cfg, f"{SPLIT_DIR}/validation.jsonl")
    training.model_dir(cfg, "init")
    rm.check_keep_best(cfg)
    tokenizer = training.load_tokenizer(cfg)
    pairs = rm.load_split(train_file)
    pairs, skipped = training.skip_too_long(cfg, pairs, training.pair_lengths(tokenizer, pairs), cfg.train.seq_len,
                                            f"{SPLIT_DIR}/train")
    train_pairs, selection_pairs, held_out = rm.selection_split(pairs, cfg.rm.selection_fraction, cfg.seed)
    evaluate = len(selection_pairs) > 0
    args = training.common_args(
        cfg, RewardConfig, evaluate=evaluate, max_length=None,  # longer pairs skipped and counted above
        center_rewards_coefficient=cfg.rm.center_rewards_coefficient,
        load_best_model_at_end=cfg.rm.keep_best, metric_for_best_model="eval_loss", greater_is_better=False,
    )
    model = training.load_model(cfg, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token: <|eot_id|>
    trainer_class, collator_class = trainer_classes()
    trainer = trainer_class(
        model=model,
        args=args,
        data_collator=collator_class(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of),
        train_dataset=tokenize_pairs(train_pairs, tokenizer),
        eval_dataset=tokenize_pairs(selection_pairs, tokenizer) if evaluate else None,
        processing_class=tokenizer,
        peft_config=training.lora_config(cfg, "SEQ_CLS"),
        callbacks=training.callbacks(cfg),
    )
    trainer.skipped_too_long = {"train": skipped}
    trainer.selection = {"split": "preference/train", "fraction": cfg.rm.selection_fraction, "seed": cfg.seed, **held_out}
    return trainer


def accuracy_by_weight(model, tokenizer, pairs: list[dict], max_len: int, batch_size: int = 8) -> dict[str, float]:
    """Share of pairs with r(chosen) > r(rejected): overall ("all") and per weight ("weight_1".."weight_3")."""
    chosen = reward.score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], max_len, batch_size)
    rejected = reward.score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], max_len, batch_size)
    wins: dict[str, list[bool]] = defaultdict(list)
    for pair, good, bad in zip(pairs, chosen, rejected):
        wins["all"].append(good > bad)
        wins[f"weight_{int(pair['weight'])}"].append(good > bad)
    return {key: sum(w) / len(w) for key, w in sorted(wins.items())}


def run(cfg) -> dict:
    rm.check_keep_best(cfg)
    finished = training.preflight(cfg, f"{SPLIT_DIR}/train.jsonl", f"{SPLIT_DIR}/validation.jsonl")
    if finished:
        return finished
    start = time.monotonic()
    training.prepare_output_dir(cfg)
    trainer = build_trainer(cfg)
    from transformers import AutoModelForSequenceClassification

    trainer.train(resume_from_checkpoint=training.resume_checkpoint(cfg))
    final = training.save_final(trainer, cfg, AutoModelForSequenceClassification)
    training.write_training_record(final, cfg, TRAINED_ON, rm_selection=trainer.selection)

    model = AutoModelForSequenceClassification.from_pretrained(str(final))
    validation = list(rm.load_split(training.data_file(cfg, f"{SPLIT_DIR}/validation.jsonl")))
    accuracy = accuracy_by_weight(model, trainer.processing_class, validation, cfg.train.seq_len, cfg.train.micro_batch)
    return training.write_summary(
        cfg, "val_accuracy", accuracy.pop("all", None), start,
        **{f"val_accuracy_{key}": value for key, value in accuracy.items()},
        best_checkpoint=trainer.state.best_model_checkpoint, steps=trainer.state.global_step,
        selection=trainer.selection, seq_len=cfg.train.seq_len, skipped_too_long=trainer.skipped_too_long,
    )
