"""rm: Bradley-Terry edit reward model with TRL's RewardTrainer.

    python -m recipes rm [key=value ...]        (./launch.sh rm ...)

Reads  DATA/pairs/{train,validation}.jsonl   {"id", "prompt", "chosen", "rejected", "kind"} in TRL's
                                              conversational preference format; both kinds mixed
                                              (good_vs_bad: good edit > bad edit; good_vs_original:
                                              good edit > the unedited original response).
Writes OUT/checkpoint-N/, OUT/final/ (sequence classification, one output, + tokenizer: the checkpoint
       with the lowest validation loss when rm.keep_best), OUT/final/hs3_training.json, OUT/summary.json.

The model starts from cfg.init or the base model with a new one-output head (AutoModelForSequenceClassification,
num_labels=1); the loss is -log sigmoid(r(chosen) - r(rejected)). Validation accuracy (r(chosen) > r(rejected))
is reported overall and per kind.
"""
from __future__ import annotations

import time

from recipes import training
from recipes.config import ConfigError


def load_split(path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward of each whole conversation, tokenized as RewardTrainer and RLOOTrainer do (chat template)."""
    import torch

    rewards: list[float] = []
    model.eval()
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        with torch.inference_mode():
            logits = model(**batch.to(model.device)).logits[:, 0]
        rewards += logits.float().tolist()
    return rewards


def pair_accuracy(model, tokenizer, pairs, batch_size: int = 8) -> dict[str, float]:
    """Share of pairs with r(prompt + chosen) > r(prompt + rejected): overall ("all") and per kind."""
    chosen = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], batch_size)
    rejected = score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], batch_size)
    wins: dict[str, list[bool]] = {"all": []}
    for pair, good, bad in zip(pairs, chosen, rejected):
        wins["all"].append(good > bad)
        wins.setdefault(pair["kind"], []).append(good > bad)
    return {kind: sum(w) / len(w) for kind, w in wins.items() if w}


def check_keep_best(cfg) -> None:
    if cfg.rm.keep_best and cfg.train.save_steps % cfg.train.eval_steps:
        raise ConfigError(
            f"rm.keep_best needs train.save_steps={cfg.train.save_steps} to be a multiple of train.eval_steps={cfg.train.eval_steps}"
        )


def build_trainer(cfg):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    train_file = training.data_file(cfg, "pairs/train.jsonl")
    validation_file = training.data_file(cfg, "pairs/validation.jsonl")
    training.model_dir(cfg, "init")
    check_keep_best(cfg)
    args = training.common_args(
        cfg, RewardConfig,
        max_length=cfg.train.seq_len,
        center_rewards_coefficient=cfg.rm.center_rewards_coefficient,
        load_best_model_at_end=cfg.rm.keep_best,  # the paper keeps the checkpoint with the lowest validation loss
        metric_for_best_model="eval_loss",
        greater_is_better=False,
    )
    tokenizer = training.load_tokenizer(cfg)
    model = training.load_model(cfg, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=load_split(train_file),
        eval_dataset=load_split(validation_file),
        processing_class=tokenizer,
        peft_config=training.lora_config(cfg, "SEQ_CLS"),
        callbacks=training.callbacks(cfg),
    )


def run(cfg) -> dict:
    check_keep_best(cfg)
    finished = training.preflight(cfg, "pairs/train.jsonl", "pairs/validation.jsonl")  # dry run; checks; or run under accelerate
    if finished:
        return finished
    start = time.monotonic()
    training.prepare_output_dir(cfg)
    trainer = build_trainer(cfg)
    from transformers import AutoModelForSequenceClassification

    trainer.train(resume_from_checkpoint=training.resume_checkpoint(cfg))
    final = training.save_final(trainer, cfg, AutoModelForSequenceClassification)  # the best checkpoint's weights
    training.write_training_record(final, cfg, training.STAGE_SPLITS["rm"])

    # Accuracy of the saved model, exact per pair (not averaged over batches).
    model = AutoModelForSequenceClassification.from_pretrained(str(final))
    accuracy = pair_accuracy(model, trainer.processing_class, list(load_split(training.data_file(cfg, "pairs/validation.jsonl"))),
                             cfg.train.micro_batch)
    return training.write_summary(
        cfg, "val_accuracy", accuracy.pop("all"), start,
        **{f"val_accuracy_{kind}": value for kind, value in sorted(accuracy.items())},
        best_checkpoint=trainer.state.best_model_checkpoint, steps=trainer.state.global_step,
    )
