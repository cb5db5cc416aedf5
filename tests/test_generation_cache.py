"""The in-process engine's KV cache (eval.engines.HFEngine cache_implementation): auto is transformers'
static cache on CUDA, where transformers compiles the decoding step (benchmarks/gpu_checks.sh measures the
speed), and its dynamic cache elsewhere; both give the same greedy outputs on left-padded batches."""
from __future__ import annotations

CONVERSATIONS = [[{"role": "user", "content": f"Question {i}: " + "tell me more " * (4 * i)}] for i in range(5)]


def test_static_cache_generates_what_the_dynamic_cache_does(varied_model_dir):
    import torch

    from eval.engines import HFEngine, Sampling
    from recipes.config import ModelConfig

    engine = HFEngine.load(ModelConfig(path=str(varied_model_dir)), None, batch_size=5)
    assert engine.cache_implementation == ("static" if torch.cuda.is_available() else None)  # auto
    sampling = Sampling(max_new_tokens=12)
    dynamic = engine.generate(CONVERSATIONS, sampling)
    static = HFEngine(engine.model, engine.tokenizer, batch_size=5, cache_implementation="static")
    assert static.cache_implementation == "static"
    outputs = static.generate(CONVERSATIONS, sampling)
    assert len({g.text for g in dynamic}) > 1, "outputs must differ between prompts for this to mean anything"
    assert [(g.text, g.finish_reason, g.completion_tokens) for g in outputs] == \
        [(g.text, g.finish_reason, g.completion_tokens) for g in dynamic]
