"""feedback: the Feedback model, SFT on the feedback subset (recipes/sft.py's trainer, another data dir).

    python -m recipes feedback [key=value ...]        (./launch.sh feedback ...)

Reads  DATA/feedback/{train,validation}.jsonl   (python -m data_prep --subsets ...,feedback): rows
       {"id", "messages": context + assistant(response) + user(evaluation instruction) + assistant(feedback)}
       (data_prep/feedback_data.py; the request is data_prep.feedback_prompt.build_feedback_request).
Writes what sft writes: OUT/checkpoint-N/, OUT/final/ (causal LM + tokenizer), final/hs3_training.json
       (trained_on: feedback/train), OUT/summary.json (eval_loss on feedback/validation).

Everything else is sft's: the loss covers only the final assistant turn (the feedback text), rows over
train.seq_len are skipped and counted, packing, LoRA and accelerate work the same way. The sources say
the Feedback model was trained with SFT only, for 1 epoch (conf/stage/feedback.yaml).
"""
from __future__ import annotations

from recipes import sft

SPLIT_DIR = "feedback"
TRAINED_ON = ["feedback/train"]


def build_trainer(cfg):
    return sft.build_trainer(cfg, SPLIT_DIR)


def run(cfg) -> dict:
    return sft.run(cfg, SPLIT_DIR, TRAINED_ON)
