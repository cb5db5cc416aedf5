"""rm: Bradley-Terry edit reward model with TRL's RewardTrainer.

    python -m launcher rm [key=value ...]        (./launch.sh rm ...)

Reads  DATA/pairs/{train,validation}.jsonl   {"id", "prompt", "chosen", "rejected", "kind"} in TRL's
                                              conversational preference format; both kinds mixed
                                              (good_vs_bad: good edit > bad edit; good_vs_original:
                                              good edit > the unedited original response).
       cfg.init                               default RUN_DIR/sft/final: the Edit RM starts from the Edit
                                              SFT model (conf/stage/rm.yaml says the source)
Writes OUT/checkpoint-N/, OUT/final/ (sequence classification, one output, + tokenizer: the checkpoint
       with the lowest selection loss when rm.keep_best), OUT/final/hs3_training.json, OUT/summary.json.

The model starts from cfg.init with a new one-output head (AutoModelForSequenceClassification,
num_labels=1); the loss is -log sigmoid(r(chosen) - r(rejected)).

Selection: rm.selection_fraction of the edit_quality/train prompts (all pairs of a prompt, drawn with
`seed`) are held out of training; the trainer's eval loss on them picks the best checkpoint
(rm.keep_best). edit_quality/validation is only reported: accuracy (r(chosen) > r(rejected)) overall
and per kind, never used to choose. engine=megatron holds out the same slice (train_and_selection, called
by recipes/megatron/nemo_rl.py) and hands it to NeMo-RL as its validation set.

Cadence: with train.eval_steps / train.save_steps null (conf/stage/rm.yaml) the selection loss is measured
every max(1, steps // rm.min_evaluations) optimizer steps, and each measured step is saved, so a run
evaluates at least rm.min_evaluations times (4 by default) whatever its length; a number given for
either key wins (evaluation_cadence, on both engines).

Every score goes through recipes.reward (the RL reward and the eval use the same function): training
pairs are tokenized with reward_input_ids, so a finished edit ends in the end-of-turn token and the
pad is not that token. Train and selection pairs longer than train.seq_len are skipped and counted
(RewardTrainer would drop them without a word); validation pairs are all scored, longer ones cut by
the shared truncation rule and counted.
"""
from __future__ import annotations

import json
import math
import random
import time

from recipes import reward, training
from recipes.config import ConfigError, data_parallel_size, grad_accum_steps


def load_split(path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")


def score_conversations(model, tokenizer, conversations: list[list[dict]], max_len: int, batch_size: int = 8) -> list[float]:
    """The reward of each whole conversation: recipes.reward.score_conversations."""
    return reward.score_conversations(model, tokenizer, conversations, max_len, batch_size)


def by_kind(pair: dict) -> str:
    return pair["kind"]


def pair_accuracy(model, tokenizer, pairs, max_len: int, batch_size: int = 8, group=by_kind) -> dict[str, float]:
    """Share of pairs with r(prompt + chosen) > r(prompt + rejected): overall ("all") and per group(pair)
    (the pair's kind here; select groups by weight)."""
    chosen = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], max_len, batch_size)
    rejected = score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], max_len, batch_size)
    wins: dict[str, list[bool]] = {"all": []}
    for pair, good, bad in zip(pairs, chosen, rejected):
        wins["all"].append(good > bad)
        wins.setdefault(group(pair), []).append(good > bad)
    return {key: sum(w) / len(w) for key, w in sorted(wins.items()) if w}


def check_keep_best(cfg, eval_steps: int | None = None, save_steps: int | None = None) -> None:
    """rm.keep_best picks among saved, evaluated steps: save_steps must be a multiple of eval_steps (the
    configured ones; or the derived ones, evaluation_cadence, once the run's length is known)."""
    eval_steps = cfg.train.eval_steps if eval_steps is None else eval_steps
    save_steps = cfg.train.save_steps if save_steps is None else save_steps
    if cfg.rm.keep_best and eval_steps and save_steps and save_steps % eval_steps:
        raise ConfigError(
            f"rm.keep_best needs train.save_steps={save_steps} to be a multiple of train.eval_steps={eval_steps}"
        )


def evaluation_cadence(cfg, steps: int) -> tuple[int, int]:
    """(eval_steps, save_steps) for a run of `steps` optimizer steps, on both engines. train.eval_steps and
    train.save_steps when given; null: every max(1, steps // rm.min_evaluations) steps, so the selection
    loss is measured at least rm.min_evaluations times when the run has that many steps (NeMo-RL also at
    its last step: rm.val_at_end); a null save_steps saves every evaluated step."""
    t = cfg.train
    eval_steps = t.eval_steps if t.eval_steps is not None else max(1, steps // cfg.rm.min_evaluations)
    save_steps = t.save_steps if t.save_steps is not None else eval_steps
    check_keep_best(cfg, eval_steps, save_steps)
    return eval_steps, save_steps


def hf_optimizer_steps(cfg, rows: int) -> int:
    """Optimizer steps of TRL's Trainer over `rows` training pairs: train.max_steps, or ceil(epochs x
    ceil(batches per process / grad_accum)) (transformers trainer.py set_initial_training_values)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    t = cfg.train
    batches = math.ceil(rows / (t.micro_batch * data_parallel_size(cfg)))
    per_epoch = max(math.ceil(batches / (t.grad_accum or grad_accum_steps(cfg))), 1)
    return math.ceil(t.epochs * per_epoch)


def selection_split(dataset, fraction: float, seed: int, source: str = "pairs/train.jsonl"):
    """(train, selection, counts): `fraction` of the distinct prompts, with all their pairs (both kinds
    of an edit_quality row, and rows repeating a prompt, stay on one side), drawn with `seed`; at least
    one prompt when fraction > 0."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(dataset["prompt"]):
        groups.setdefault(json.dumps(prompt, sort_keys=True, ensure_ascii=False), []).append(i)
    keys = sorted(groups)
    n = min(len(keys) - 1, max(1, math.ceil(fraction * len(keys)))) if fraction > 0 else 0
    if fraction > 0 and n < 1:
        raise ConfigError(f"rm.selection_fraction={fraction}: {source} has {len(keys)} prompt(s), too few to hold one out")
    held = set(random.Random(seed).sample(keys, n))
    selection = sorted(i for key in held for i in groups[key])
    train = sorted(i for key in keys if key not in held for i in groups[key])
    return dataset.select(train), dataset.select(selection), {"prompts": n, "pairs": len(selection)}


def train_and_selection(cfg, tokenizer, split_dir: str = "pairs", source: str = "edit_quality/train"):
    """DATA/split_dir/train.jsonl -> (train pairs, selection pairs, pairs skipped as too long, selection record):
    pairs longer than train.seq_len are skipped and counted (RewardTrainer would drop them silently; NeMo-RL
    would keep them in its batches at loss weight 0, processors.py:276-296 at v0.7.0), then
    rm.selection_fraction of the prompts are held out with `seed`. Both
    engines call this, so engine=megatron selects on exactly the HF engine's slice."""
    train_file = training.data_file(cfg, f"{split_dir}/train.jsonl")
    pairs = load_split(train_file)
    pairs, skipped = training.skip_too_long(cfg, pairs, training.pair_lengths(tokenizer, pairs), cfg.train.seq_len,
                                            f"{split_dir}/train")
    train_pairs, selection_pairs, held_out = selection_split(pairs, cfg.rm.selection_fraction, cfg.seed,
                                                             f"{split_dir}/train.jsonl")
    record = {"split": source, "fraction": cfg.rm.selection_fraction, "seed": cfg.seed, **held_out}
    return train_pairs, selection_pairs, skipped, record


def tokenize_pairs(dataset, tokenizer, keep: tuple[str, ...] = ()):
    """RewardTrainer's processed form (chosen_ids, rejected_ids): reward_input_ids of each side, plus the
    columns in `keep` (select's weight)."""
    def ids(row):
        return {"chosen_ids": reward.reward_input_ids(tokenizer, row["prompt"] + row["chosen"]),
                "rejected_ids": reward.reward_input_ids(tokenizer, row["prompt"] + row["rejected"]),
                **{column: row[column] for column in keep}}

    return dataset.map(ids, remove_columns=dataset.column_names)


def build_trainer(cfg, split_dir: str = "pairs", source: str = "edit_quality/train", trainer_classes=None,
                  keep: tuple[str, ...] = ()):
    """The RewardTrainer for cfg on DATA/split_dir (select passes its own split, its (trainer, collator)
    classes and the columns its loss needs)."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    training.data_file(cfg, f"{split_dir}/validation.jsonl")
    training.model_dir(cfg, "init")
    check_keep_best(cfg)
    tokenizer = training.load_tokenizer(cfg)
    train_pairs, selection_pairs, skipped, selection = train_and_selection(cfg, tokenizer, split_dir, source)
    evaluate = len(selection_pairs) > 0
    eval_steps, save_steps = evaluation_cadence(cfg, hf_optimizer_steps(cfg, len(train_pairs)))
    args = training.common_args(
        cfg, RewardConfig, evaluate=evaluate, eval_steps=eval_steps, save_steps=save_steps,
        # No length filter inside TRL (trl/trainer/reward_trainer.py:730-739 drops longer pairs silently):
        # the pairs over train.seq_len were skipped and counted above.
        max_length=None,
        center_rewards_coefficient=cfg.rm.center_rewards_coefficient,
        load_best_model_at_end=cfg.rm.keep_best,  # the paper keeps the checkpoint with the lowest held-out loss
        metric_for_best_model="eval_loss",
        greater_is_better=False,
    )
    model = training.load_model(cfg, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token: <|eot_id|>
    trainer_class, collator = RewardTrainer, None
    if trainer_classes:
        trainer_class, collator_class = trainer_classes()
        collator = collator_class(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
    trainer = trainer_class(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=tokenize_pairs(train_pairs, tokenizer, keep),
        eval_dataset=tokenize_pairs(selection_pairs, tokenizer, keep) if evaluate else None,
        processing_class=tokenizer,
        peft_config=training.lora_config(cfg, "SEQ_CLS"),
        callbacks=training.callbacks(cfg),
    )
    trainer.skipped_too_long = {"train": skipped}
    trainer.selection = {**selection, "eval_steps": eval_steps, "save_steps": save_steps}
    return trainer


def run(cfg, split_dir: str = "pairs", trained_on: list[str] | None = None, group=by_kind, build=build_trainer) -> dict:
    """Train, keep the selected checkpoint in final/, report accuracy on DATA/split_dir/validation.jsonl
    (select runs this with its split, its grouping by weight and its trainer)."""
    check_keep_best(cfg)
    finished = training.preflight(cfg, f"{split_dir}/train.jsonl", f"{split_dir}/validation.jsonl")  # dry run; checks; or run under accelerate
    if finished:
        return finished
    start = time.monotonic()
    training.prepare_output_dir(cfg)
    trainer = build(cfg)
    from transformers import AutoModelForSequenceClassification

    trainer.train(resume_from_checkpoint=training.resume_checkpoint(cfg))
    final = training.save_final(trainer, cfg, AutoModelForSequenceClassification)  # the best checkpoint's weights
    training.write_training_record(final, cfg, trained_on or training.STAGE_SPLITS["rm"], rm_selection=trainer.selection)

    # Accuracy of the saved model on edit_quality/validation, exact per pair; reported, not selected on.
    model = AutoModelForSequenceClassification.from_pretrained(str(final))
    tokenizer = trainer.processing_class
    validation_set = load_split(training.data_file(cfg, f"{split_dir}/validation.jsonl"))
    validation = list(validation_set)
    over = sum(n > cfg.train.seq_len for n in training.pair_lengths(tokenizer, validation_set)) if validation else 0
    accuracy = pair_accuracy(model, tokenizer, validation, cfg.train.seq_len, cfg.train.micro_batch, group)
    return training.write_summary(
        cfg, "val_accuracy", accuracy.pop("all", None), start,
        **{f"val_accuracy_{kind}": value for kind, value in sorted(accuracy.items())},
        best_checkpoint=trainer.state.best_model_checkpoint, steps=trainer.state.global_step,
        selection=trainer.selection, seq_len=cfg.train.seq_len, skipped_too_long=trainer.skipped_too_long,
        validation_pairs_truncated=over,
    )
