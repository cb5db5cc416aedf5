"""sft: supervised edit fine-tuning with TRL's SFTTrainer.

    python -m recipes sft [key=value ...]        (./launch.sh sft ...)

Reads  DATA/sft/{train,validation}.jsonl   rows {"id", "messages", ...}: the context, the original
                                             response, the edit request, and last the edited response.
Writes OUT/checkpoint-N/, OUT/final/ (causal LM + tokenizer), OUT/final/hs3_training.json, OUT/summary.json.

The loss covers only the final assistant turn (the edited response and its <|eot_id|>): each row is
split into TRL's prompt-completion form, prompt = messages[:-1], completion = messages[-1:], and
SFTTrainer masks the prompt (labels -100). `train.packing=true` packs rows with best-fit decreasing into
padding-free batches carrying position_ids; transformers then builds a block-diagonal causal mask
(sdpa, eager, flash-attention), so packed neighbours never attend to each other.
"""
from __future__ import annotations

import time

from recipes import training


def to_prompt_completion(row: dict) -> dict:
    """Everything before the edited response is the prompt; the edited response is the completion."""
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def load_split(path):
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(path), split="train")
    return dataset.map(to_prompt_completion, remove_columns=dataset.column_names)


def build_trainer(cfg):
    """The SFTTrainer for cfg (datasets tokenized, model loaded); also used by the tests and the benchmark."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    train_file = training.data_file(cfg, "sft/train.jsonl")
    validation_file = training.data_file(cfg, "sft/validation.jsonl")
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
    model = training.load_model(cfg, AutoModelForCausalLM)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=load_split(train_file),
        eval_dataset=load_split(validation_file),
        processing_class=tokenizer,
        peft_config=training.lora_config(cfg, "CAUSAL_LM"),
        callbacks=training.callbacks(cfg),
    )


def run(cfg) -> dict:
    finished = training.preflight(cfg, "sft/train.jsonl", "sft/validation.jsonl")  # dry run; checks; or run under accelerate
    if finished:
        return finished
    start = time.monotonic()
    training.prepare_output_dir(cfg)
    trainer = build_trainer(cfg)
    from transformers import AutoModelForCausalLM

    trainer.train(resume_from_checkpoint=training.resume_checkpoint(cfg))
    eval_loss = trainer.evaluate()["eval_loss"]

    final = training.save_final(trainer, cfg, AutoModelForCausalLM)
    training.write_training_record(final, cfg, training.STAGE_SPLITS["sft"])
    return training.write_summary(cfg, "eval_loss", eval_loss, start, steps=trainer.state.global_step)
