"""rl: RLOO against the edit reward model, with TRL's RLOOTrainer.

    python -m recipes rl [key=value ...]        (./launch.sh rl ...)

Reads  DATA/prompts/train.jsonl   {"id", "prompt", "original_response", "reference_edit"}: the conversation
                                   up to the edit request
       cfg.init                    the policy's start and its KL reference (default RUN_DIR/sft/final)
       cfg.reward_model            the reward model (default RUN_DIR/rm/final)
Writes OUT/checkpoint-N/, OUT/final/ (causal LM + tokenizer), OUT/final/hs3_training.json, OUT/summary.json.

Each step samples rl.k completions for each of rl.prompts_per_step prompts (train.global_batch = their
product). A completion's reward is the reward model's score of (prompt, completion) minus rl.kl_coef times
its summed log-ratio to the reference; its advantage is that reward minus the mean reward of the other
k-1 completions of the same prompt (RLOO's leave-one-out baseline, computed inside RLOOTrainer).
With peft.enabled the reference is the policy with its adapter disabled (no second model copy).
Logged: mean reward, KL, and the copy rate (share of completions equal to the original response after
whitespace normalisation; SFT alone copies ~30% of the time on the paper's data).
"""
from __future__ import annotations

import time

from data_prep import is_copy
from recipes import training
from recipes.config import ConfigError


def copy_indicator(prompts, completions, original_response, **kwargs) -> list[float]:
    """1.0 where the completion is the original response (whitespace-normalised), else 0.0. Passed to
    RLOOTrainer as a reward function with weight 0: it never changes the reward, and its logged mean
    (`rewards/copy_indicator/mean`) is the copy rate."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(is_copy(t, o)) for t, o in zip(texts, original_response)]


def check_batch(cfg) -> None:
    if cfg.reward_model is None:
        raise ConfigError("reward_model is not set (rm=PATH to a reward model checkpoint)")
    prompts_x_k = cfg.rl.prompts_per_step * cfg.rl.k
    if cfg.train.global_batch != prompts_x_k:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} must equal rl.prompts_per_step={cfg.rl.prompts_per_step}"
            f" x rl.k={cfg.rl.k} (= {prompts_x_k}) completions per step"
        )


def build_trainer(cfg):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import RLOOConfig, RLOOTrainer

    check_batch(cfg)
    prompts_file = training.data_file(cfg, "prompts/train.jsonl")
    training.model_dir(cfg, "init")
    reward_path = training.model_dir(cfg, "reward_model")
    args = training.common_args(
        cfg, RLOOConfig, evaluate=False,
        num_generations=cfg.rl.k,
        max_completion_length=cfg.rl.max_new_tokens,
        temperature=cfg.rl.temperature,
        top_p=cfg.rl.top_p,
        beta=cfg.rl.kl_coef,
        reward_weights=[1.0, 0.0],  # the reward model; the copy indicator is only logged
        generation_batch_size=cfg.train.global_batch,  # one generation round per optimizer step
        ds3_gather_for_generation=cfg.hf.gather_weights_for_generation,
    )
    tokenizer = training.load_tokenizer(cfg)
    policy = training.load_model(cfg, AutoModelForCausalLM)
    reward_model = training.load_model(cfg, AutoModelForSequenceClassification, source=reward_path, num_labels=1)
    reward_tokenizer = training.load_tokenizer(cfg, reward_path)
    return RLOOTrainer(
        model=policy,
        reward_funcs=[reward_model, copy_indicator],
        reward_processing_classes=[reward_tokenizer, None],
        args=args,
        train_dataset=load_dataset("json", data_files=str(prompts_file), split="train"),
        processing_class=tokenizer,
        peft_config=training.lora_config(cfg, "CAUSAL_LM"),
        callbacks=training.callbacks(cfg),
    )


def run(cfg) -> dict:
    check_batch(cfg)
    finished = training.preflight(cfg, "prompts/train.jsonl")  # dry run; checks; or run under accelerate
    if finished:
        return finished
    start = time.monotonic()
    training.prepare_output_dir(cfg)
    trainer = build_trainer(cfg)
    from transformers import AutoModelForCausalLM

    trainer.train(resume_from_checkpoint=training.resume_checkpoint(cfg))
    final = training.save_final(trainer, cfg, AutoModelForCausalLM)
    training.write_training_record(final, cfg, training.STAGE_SPLITS["rl"])
    return training.write_summary(
        cfg, "mean_reward", training.mean_logged(trainer, "reward"), start,
        copy_rate=training.mean_logged(trainer, "rewards/copy_indicator/mean"),
        kl=training.mean_logged(trainer, "kl"),
        last_reward=training.last_logged(trainer, "reward"),
    )
