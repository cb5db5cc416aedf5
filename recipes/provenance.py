"""What a model is, by content: a cheap fingerprint of a model directory, and the inputs a training record
lists (recipes.training.write_training_record; the eval reads them back: eval/lineage.py).

`model_fingerprint(dir)` is a sha256 that stays the same for a copy of the model (another path, new
mtimes, another sharding of the same tensors) and changes when what the model computes changes. It covers:
  - config.json, parsed, minus the keys that say where and by which transformers version it was saved
    (`_name_or_path`, `transformers_version`);
  - the tokenizer files, whole (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    chat_template.jinja/.json, tokenizer.model, vocab.json, merges.txt);
  - the weights. Every tensor of every *.safetensors file, whatever the sharding: its name, dtype and
    shape, and three 4 KiB samples of its bytes (its start, middle and end; a tensor under 12 KiB whole).
    Other weight files (*.bin, *.gguf, *.pt, *.pth, except the trainer's own) contribute their size and 64
    samples of 4 KiB, evenly spread.
Not covered: the bytes between the samples (a fine-tune changes every element of the tensors it trains,
LoRA merged into a matrix too, so a trained model differs from its start and from its other checkpoints
at the samples; a change of a few scattered elements could pass unseen), training state (optimizer,
trainer_state.json, hs3_training.json), file names and mtimes, the dtype a model is loaded in (a bf16
re-save of an fp32 model is another fingerprint). What it reads: the safetensors headers and at most
12 KiB per tensor (Llama-3.3-70B has 723 tensors: about 9 MB of a 140 GB checkpoint), plus 256 KiB per
other weight file; it never reads a checkpoint whole.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Optional

from hs3.io import sha256_file

SAMPLE = 4096
FILE_SAMPLES = 64
CONFIG_VOLATILE = ("_name_or_path", "transformers_version")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
TRAINER_FILES = ("optimizer", "scheduler", "rng_state", "training_args", "scaler")


def _is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES and not path.name.startswith(TRAINER_FILES)


def _read_at(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _span_digest(f, begin: int, end: int) -> str:
    """sha256 of a byte span's length and its start, middle and end samples (all of it when short)."""
    size = end - begin
    h = hashlib.sha256(str(size).encode())
    if size <= 3 * SAMPLE:
        h.update(_read_at(f, begin, size))
    else:
        for offset in (begin, begin + size // 2 - SAMPLE // 2, end - SAMPLE):
            h.update(_read_at(f, offset, SAMPLE))
    return h.hexdigest()


def _safetensors_tensors(path: Path) -> Optional[list[list]]:
    """[name, dtype, shape, digest] of each tensor of a safetensors file (its header: 8-byte little-endian
    length, then JSON {name: {dtype, shape, data_offsets}}), or None when the file is not one."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                return None
            header = json.loads(f.read(length))
            base = 8 + length
            tensors = []
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                tensors.append([name, info["dtype"], info["shape"], _span_digest(f, base + begin, base + end)])
            return tensors
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _file_digest(path: Path) -> str:
    """A weight file of another format: its size and FILE_SAMPLES samples spread over it."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= FILE_SAMPLES * SAMPLE:
            h.update(f.read())
        else:
            for k in range(FILE_SAMPLES):
                h.update(_read_at(f, (size - SAMPLE) * k // (FILE_SAMPLES - 1), SAMPLE))
    return h.hexdigest()


def model_fingerprint(path) -> Optional[str]:
    """The content fingerprint of a model directory (module docstring), or None when `path` is no
    directory or holds neither a config.json nor weights."""
    root = Path(path) if path else None
    if root is None or not root.is_dir():
        return None
    parts: dict = {"files": {}, "tensors": [], "weight_files": []}
    config = root / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in CONFIG_VOLATILE}
            parts["files"]["config.json"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        else:
            parts["files"]["config.json"] = sha256_file(config)
    for name in TOKENIZER_FILES:
        if (root / name).is_file():
            parts["files"][name] = sha256_file(root / name)
    for file in sorted(p for p in root.iterdir() if p.is_file() and _is_weight_file(p)):
        tensors = _safetensors_tensors(file) if file.suffix == ".safetensors" else None
        if tensors is not None:
            parts["tensors"] += tensors
        else:
            parts["weight_files"].append(_file_digest(file))
    if "config.json" not in parts["files"] and not parts["tensors"] and not parts["weight_files"]:
        return None
    parts["tensors"].sort()
    parts["weight_files"].sort()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def hub_snapshot(repo_id: str) -> Optional[str]:
    """The local snapshot dir of a hub model already in the Hugging Face cache (its config.json's dir),
    without any network call; None when it is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id huggingface_hub rejects (not org/name): not a cached hub model
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def describe_model(spec, resolved: Optional[str] = None) -> Optional[dict]:
    """{"path": what was named, "resolved": the local dir it is, "fingerprint"} for a model dir, a hub id
    (its snapshot in the HF cache, when there) or a builtin model (resolved: its built dir); an endpoint
    is {"path": URL, "endpoint": true} (nothing to fingerprint here)."""
    if spec is None:
        return None
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        return {"path": spec, "endpoint": True, "fingerprint": None}
    local = resolved or (spec if Path(spec).is_dir() else hub_snapshot(spec))
    local = str(Path(local).resolve()) if local and Path(local).is_dir() else None
    return {"path": spec, "resolved": local, "fingerprint": model_fingerprint(local)}


def training_inputs(cfg, more: Optional[dict] = None) -> dict:
    """What a training stage read, each with its fingerprint: base_model (model.path), init (the
    checkpoint it started from: rm's is the sft model), data_manifest (sha256), and for rl the
    reward_model and the KL reference (the initial policy), for dpo the reference. `more` adds keys to
    these entries (rl: how its reward model scored)."""
    from recipes.models import resolve_model_path

    base = str(cfg.model.path)
    base_dir = None
    if base.startswith(("builtin:", "pkg:")):
        try:
            base_dir = resolve_model_path(cfg.model)
        except Exception:  # a base that cannot be resolved here is recorded by name only
            base_dir = None
    inputs: dict = {"base_model": describe_model(base, base_dir)}
    if cfg.init:
        inputs["init"] = describe_model(str(cfg.init))
    manifest = Path(cfg.data_dir) / "manifest.json"
    inputs["data_manifest"] = {"path": str(manifest), "sha256": sha256_file(manifest) if manifest.is_file() else None}
    if cfg.stage == "rl" and cfg.reward_model:
        inputs["reward_model"] = describe_model(str(cfg.reward_model))
    if cfg.stage in ("rl", "dpo"):
        inputs["reference"] = dict(inputs.get("init") or inputs["base_model"])
    for key, values in (more or {}).items():
        inputs.setdefault(key, {}).update(values)
    return inputs
