"""dpo: offline preference optimisation on the edit pairs with TRL's DPOTrainer (an alternative to rl).

    python -m launcher dpo [key=value ...]        (./launch.sh dpo ...)

Reads  DATA/pairs/{train,validation}.jsonl   TRL conversational preference format, both kinds mixed
       cfg.init                               the policy's start (default RUN_DIR/sft/final)
Writes OUT/checkpoint-N/, OUT/final/ (causal LM + tokenizer), OUT/final/hs3_training.json, OUT/summary.json.

The reference model is the starting policy: without LoRA TRL loads a frozen copy of cfg.init; with
peft.enabled it uses the same model with its adapter disabled (no second copy). The summary's metric is
the validation reward accuracy: the share of pairs where the implicit reward
beta * log(pi/pi_ref) of the chosen edit exceeds that of the rejected one.

Length: a pair whose prompt + chosen or prompt + rejected is longer than train.seq_len is skipped
(DPOTrainer would keep the start and cut the edits), counted in summary.json (`skipped_too_long`) and
logged; the validation pairs for the reward accuracy likewise (counted apart).
"""
from __future__ import annotations

import time

from recipes import training


def load_split(path, cfg, tokenizer, name: str):
    """The pairs, without those over train.seq_len; returns (dataset, number skipped)."""
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(path), split="train")
    lengths = training.pair_lengths(tokenizer, dataset)
    return training.skip_too_long(cfg, dataset, lengths, cfg.train.seq_len, f"pairs/{name}")


def build_trainer(cfg):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    train_file = training.data_file(cfg, "pairs/train.jsonl")
    validation_file = training.data_file(cfg, "pairs/validation.jsonl")
    training.model_dir(cfg, "init")
    args = training.common_args(
        cfg, DPOConfig,
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
        max_length=cfg.train.seq_len,
    )
    tokenizer = training.load_tokenizer(cfg)
    train_dataset, skipped_train = load_split(train_file, cfg, tokenizer, "train")
    eval_dataset, skipped_eval = load_split(validation_file, cfg, tokenizer, "validation")
    model = training.load_model(cfg, AutoModelForCausalLM)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # TRL: a frozen copy of the start, or the adapter-disabled model with LoRA
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=training.lora_config(cfg, "CAUSAL_LM"),
        callbacks=training.callbacks(cfg),
    )
    trainer.skipped_too_long = {"train": skipped_train, "validation": skipped_eval}
    return trainer


def run(cfg) -> dict:
    finished = training.preflight(cfg, "pairs/train.jsonl", "pairs/validation.jsonl")  # dry run; checks; or run under accelerate
    if finished:
        return finished
    start = time.monotonic()
    training.prepare_output_dir(cfg)
    trainer = build_trainer(cfg)
    from transformers import AutoModelForCausalLM

    trainer.train(resume_from_checkpoint=training.resume_checkpoint(cfg))
    metrics = trainer.evaluate()

    final = training.save_final(trainer, cfg, AutoModelForCausalLM)
    training.write_training_record(final, cfg, training.STAGE_SPLITS["dpo"])
    return training.write_summary(
        cfg, "reward_accuracy", metrics["eval_rewards/accuracies"], start,
        eval_loss=metrics["eval_loss"], reward_margin=metrics["eval_rewards/margins"],
        seq_len=cfg.train.seq_len, skipped_too_long=trainer.skipped_too_long,
    )
