"""sft: supervised edit fine-tuning with TRL's SFTTrainer.

    python -m launcher sft [key=value ...]        (./launch.sh sft ...)

Reads  DATA/sft/{train,validation}.jsonl   rows {"id", "messages", ...}: the context, the original
                                             response, the edit request, and last the edited response.
Writes OUT/checkpoint-N/, OUT/final/ (causal LM + tokenizer), OUT/final/hs3_training.json, OUT/summary.json.

The loss covers only the final assistant turn (the edited response and its <|eot_id|>): each row is
split into TRL's prompt-completion form, prompt = messages[:-1], completion = messages[-1:], and
SFTTrainer masks the prompt (labels -100). `train.packing=true` packs rows with best-fit decreasing into
padding-free batches carrying position_ids; transformers then builds a block-diagonal causal mask
(sdpa, eager, flash-attention), so packed neighbours never attend to each other.

Length: a row whose whole conversation (chat template) is longer than train.seq_len is not trained on
(SFTTrainer would keep its start and cut the edit, <|eot_id|> included); such rows are skipped, counted
in summary.json (`skipped_too_long`) and logged. Built with prep.max_seq_len = train.seq_len, the data
step has already rejected them and nothing is skipped here.
"""
from __future__ import annotations

import time

from recipes import training
from recipes.config import ConfigError


def to_prompt_completion(row: dict) -> dict:
    """Everything before the edited response is the prompt; the edited response is the completion."""
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def load_split(path, cfg=None, tokenizer=None, name: str = "sft/train"):
    """The split as prompt-completion rows; with cfg and tokenizer, rows over train.seq_len left out.
    Returns (dataset, number skipped)."""
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(path), split="train")
    skipped = 0
    if cfg is not None:
        lengths = training.token_lengths(tokenizer, list(dataset["messages"]))
        dataset, skipped = training.skip_too_long(cfg, dataset, lengths, cfg.train.seq_len, name)
    return dataset.map(to_prompt_completion, remove_columns=dataset.column_names), skipped


def build_trainer(cfg, split_dir: str = "sft"):
    """The SFTTrainer for cfg (datasets tokenized, model loaded); also used by the tests and the benchmark."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    train_file = training.data_file(cfg, f"{split_dir}/train.jsonl")
    validation_file = training.data_file(cfg, f"{split_dir}/validation.jsonl")
    training.model_dir(cfg, "init")
    args = training.common_args(
        cfg, SFTConfig,
        max_length=cfg.train.seq_len,
        packing=cfg.train.packing,
        packing_strategy="bfd",  # padding-free: position_ids restart per row, no attention across rows
        completion_only_loss=True,
        eval_packing=False,
    )
    tokenizer = training.load_tokenizer(cfg)
    train_dataset, skipped_train = load_split(train_file, cfg, tokenizer, f"{split_dir}/train")
    # The eval loss is only monitored here; its rows over the limit are left out too (counted), so that
    # it is never a loss on cut targets. The held-out split itself is scored whole by the eval.
    eval_dataset, skipped_eval = load_split(validation_file, cfg, tokenizer, f"{split_dir}/validation")
    for name, dataset, skipped in (("train", train_dataset, skipped_train), ("validation", eval_dataset, skipped_eval)):
        if len(dataset) == 0:  # TRL would stop with a bare StopIteration
            raise ConfigError(f"{split_dir}/{name}.jsonl: no usable row ({skipped} longer than train.seq_len="
                              f"{cfg.train.seq_len}); raise train.seq_len or rebuild the data")
    model = training.load_model(cfg, AutoModelForCausalLM)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=training.lora_config(cfg, "CAUSAL_LM"),
        callbacks=training.callbacks(cfg),
    )
    trainer.skipped_too_long = {"train": skipped_train, "validation": skipped_eval}
    return trainer


def run(cfg, split_dir: str = "sft", trained_on: list[str] | None = None) -> dict:
    """Train on DATA/split_dir/ (sft: edit conversations; the feedback stage passes feedback/)."""
    finished = training.preflight(cfg, f"{split_dir}/train.jsonl", f"{split_dir}/validation.jsonl")  # dry run; checks; or run under accelerate
    if finished:
        return finished
    start = time.monotonic()
    training.prepare_output_dir(cfg)
    trainer = build_trainer(cfg, split_dir)
    from transformers import AutoModelForCausalLM

    trainer.train(resume_from_checkpoint=training.resume_checkpoint(cfg))
    eval_loss = trainer.evaluate()["eval_loss"]

    final = training.save_final(trainer, cfg, AutoModelForCausalLM)
    training.write_training_record(final, cfg, trained_on or training.STAGE_SPLITS["sft"])
    return training.write_summary(cfg, "eval_loss", eval_loss, start, steps=trainer.state.global_step,
                                  seq_len=cfg.train.seq_len, skipped_too_long=trainer.skipped_too_long)
