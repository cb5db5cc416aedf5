"""feedback: the Feedback model, SFT on the feedback subset (recipes/sft.py's trainer, another data dir).

    python -m launcher feedback [key=value ...]        (./launch.sh feedback ...)

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

from recipes import sft, training

SPLIT_DIR = "feedback"
TRAINED_ON = training.STAGE_SPLITS["feedback"]


def build_trainer(cfg):
    return sft.build_trainer(cfg, SPLIT_DIR)


def run(cfg) -> dict:
    return sft.run(cfg, SPLIT_DIR, TRAINED_ON)


def megatron_view(cfg):
    """cfg for Megatron-Bridge's sft job (recipes/megatron/bridge_sft.py), reading feedback/ as its sft/:
    OUT/data_view/sft is a symlink to DATA/feedback (and manifest.json to DATA's), data_dir points there.
    bridge_sft resolves the links when it renders, so its job reads DATA/feedback/*.jsonl and every fix
    of the Megatron sft render applies to the Feedback model unchanged."""
    import os
    from pathlib import Path

    from omegaconf import OmegaConf

    data = Path(cfg.data_dir).resolve()
    view = Path(cfg.out).resolve() / "data_view"
    view.mkdir(parents=True, exist_ok=True)
    for name, target in (("sft", data / SPLIT_DIR), (SPLIT_DIR, data / SPLIT_DIR), ("manifest.json", data / "manifest.json")):
        link = view / name
        if link.is_symlink() and Path(os.readlink(link)) != target:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target)
    viewed = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    viewed.data_dir = str(view)
    return viewed


def render(cfg) -> None:
    """The SLURM executor's hook (recipes.megatron.build_command): bridge_sft's files, on feedback/."""
    from recipes.megatron import bridge_sft

    bridge_sft.render(megatron_view(cfg))


def build_command(cfg) -> list[str]:
    from recipes.megatron import bridge_sft

    return bridge_sft.build_command(megatron_view(cfg))


def run_megatron(cfg) -> dict:
    """engine=megatron: Megatron-Bridge SFT as the Edit model's sft, on feedback/ (megatron_view)."""
    from recipes.megatron import bridge_sft

    return bridge_sft.run(megatron_view(cfg))
