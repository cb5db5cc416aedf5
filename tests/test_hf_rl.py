"""rl on the HF engine: RLOO's leave-one-out baseline on the trainer's own advantages; copy rate."""
from __future__ import annotations

import pytest
import torch

from recipes import rl
from recipes.config import compose


@pytest.fixture(scope="module")
def random_reward_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a fresh one-output head: a reward model whose scores differ per completion."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "final"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_rloo_advantage_is_reward_minus_mean_of_the_other_rollouts(edit_data_dir, tmp_path, tiny_model_dir,
                                                                    random_reward_model):
    k = 4
    cfg = compose("rl", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                         f"rm={random_reward_model}", f"rl.k={k}", "rl.max_new_tokens=8",
                         "rl.kl_coef=0.0"])  # no KL term: the reward is exactly the reward model's score
    trainer = rl.build_trainer(cfg)
    prompts = [trainer.train_dataset[i] for i in range(cfg.rl.prompts_per_step)]
    batch = [row for row in prompts for _ in range(k)]  # RLOOTrainer's sampler repeats each prompt k times

    trainer.model.train()
    scored = trainer._generate_and_score_completions(batch)  # the trainer's own reward + advantage code

    reward_name = trainer.reward_func_names[0]
    rewards = torch.tensor(trainer._logs["rewards"][reward_name]).view(-1, k)
    assert rewards.std() > 0, "rewards must differ for the baseline to be tested"
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    torch.testing.assert_close(scored["advantages"], (rewards - others_mean).view(-1))
    # the copy indicator has weight 0: it is logged, never part of the reward
    assert list(trainer._logs["rewards"]["copy_indicator"]) == [0.0] * len(batch)


def test_copy_indicator_ignores_whitespace_only():
    completions = [[{"role": "assistant", "content": "Hello  world.\n"}],
                   [{"role": "assistant", "content": "Hello world!"}]]
    originals = ["Hello world.", "Hello world."]
    assert rl.copy_indicator(prompts=[None, None], completions=completions, original_response=originals) == [1.0, 0.0]


def test_with_lora_the_reference_is_the_adapter_disabled_policy(edit_data_dir, tmp_path, tiny_model_dir,
                                                                random_reward_model):
    """peft.enabled: no second model copy; the KL reference is the policy with its adapter switched off,
    so at the start (LoRA's B = 0) the policy equals its reference and the logged KL is exactly 0."""
    from peft import PeftModel

    cfg = compose("rl", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                         f"rm={random_reward_model}", "rl.max_new_tokens=8", "peft.enabled=true", "peft.r=4"])
    trainer = rl.build_trainer(cfg)
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    trainer.model.train()
    trainer._generate_and_score_completions([trainer.train_dataset[0]] * cfg.rl.k)
    assert trainer._metrics["train"]["kl"] == [0.0]
