"""Which model an eval scores, the settings each model is loaded at, and where the results go. The edit,
Feedback and Select evals (eval/run.py, feedback_eval.py, select_eval.py) all start here.

The model under test is exactly what the user named:
    init=...    a checkpoint dir or endpoint (the pipeline's eval entries name their stage's final/ so);
    model=...   otherwise: a checkpoint dir, an http(s) endpoint, a hub id, or a conf/model preset. An
                explicit model= drops conf/stage/eval.yaml's default init (recipes.config.compose), so it
                is never replaced by the run's checkpoint;
    neither     ${run_dir}/rl/final, the pipeline's policy.
A hub id is loaded when the Hugging Face hub (or the local HF cache) has it; otherwise a one-line error
says how to serve it and pass model=http://HOST:PORT/v1.

Every local model (the policy, rm=, eval.gold_rm, a Select model) is loaded and scored at its own
settings (`model_settings`): dtype and sequence length from its hs3_training.json (what it was trained
at), else from its config.json (torch_dtype / dtype, max_position_embeddings), never from the preset the
command line happened to compose (model=PATH sits on the tiny preset: float32, seq_len 1024).
eval.dtype=float32|bfloat16|float16 loads every local model in that dtype instead.

Out dir: ${run_dir}/eval/${eval.name} by default (one dir per model); `claim_out_dir` refuses a dir that
holds another model's eval (or another stage's output) and records this eval's model in eval_model.json.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from hs3.io import UserError, atomic_write_json
from recipes.config import DTYPES, ConfigError

from eval.data import training_record
from eval.engines import HFEngine, HTTPEngine, is_endpoint

# HelpSteer3's edit and edit_quality subsets ship these two splits; the data step writes both.
SPLITS = ("train", "validation")
OWNER_FILE = "eval_model.json"
TASKS = ("auto", "edit", "feedback", "select")


def check_config(cfg) -> None:
    """Eval keys that need more than a type (one line, before anything is loaded)."""
    if cfg.eval.split not in SPLITS:
        raise ConfigError(f"eval.split={cfg.eval.split}: no such split (HelpSteer3's held-out split is validation)")
    if cfg.eval.dtype != "auto" and cfg.eval.dtype not in DTYPES:
        raise ConfigError(f"eval.dtype={cfg.eval.dtype}: expected auto, {', '.join(DTYPES)}")


def model_under_test(cfg, check: bool = True) -> Optional[str]:
    """A checkpoint dir or endpoint to score, or None: the configured model itself (a hub id,
    builtin:tiny, pkg:...). See the module docstring."""
    if cfg.init:
        init = str(cfg.init)
        if check and not (is_endpoint(init) or Path(init).is_dir()):
            raise UserError(f"init={init}: no such checkpoint (score a model with model=PATH_OR_ENDPOINT_OR_HUB_ID)")
        return init
    path = str(cfg.model.path)
    if is_endpoint(path) or Path(path).is_dir():
        return path
    return None


def is_hub_id(spec: str) -> bool:
    return not (is_endpoint(spec) or spec.startswith(("builtin:", "pkg:")) or Path(spec).exists())


def require_hub(repo_id: str) -> str:
    """The local snapshot dir of a hub model: from the HF cache, or downloaded when the hub is reachable;
    otherwise a one-line error that says how to score it through an endpoint instead."""
    from recipes.provenance import hub_snapshot

    cached = hub_snapshot(repo_id)
    if cached:
        return cached
    reason = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else None
    if reason is None:
        try:
            from huggingface_hub import hf_hub_download

            return str(Path(hf_hub_download(repo_id, "config.json")).parent)
        except Exception as exc:  # offline, unknown id, gated: all the same to the user
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    raise UserError(f"model={repo_id}: a hub id that cannot be loaded here ({reason}); serve it where it can be "
                    f"(e.g. `vllm serve {repo_id} --tensor-parallel-size 8`, or NVIDIA NIM) and pass "
                    f"model=http://HOST:8000/v1")


def local_dir(cfg, target: Optional[str]) -> Optional[str]:
    """The directory the model under test is loaded from (None for an endpoint); a hub id must be
    loadable (require_hub)."""
    if target:
        return None if is_endpoint(target) else target
    spec = str(cfg.model.path)
    if is_hub_id(spec):
        return require_hub(spec)
    from recipes.models import resolve_model_path

    return resolve_model_path(cfg.model)


@dataclass(frozen=True)
class Settings:
    dtype: str
    seq_len: Optional[int]
    dtype_from: str
    seq_len_from: str


def _read_config(path: Optional[str]) -> dict:
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _positive_int(value) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_settings(path: Optional[str], forced_dtype: str = "auto", preset: Optional[Settings] = None) -> Settings:
    """The dtype and sequence length a local model is loaded and scored at: its training record's, else its
    config.json's, else `preset` (a conf/model preset describing this very model, e.g. a GGUF with no
    config.json), else float32 and no limit. forced_dtype (eval.dtype) other than auto wins for the dtype."""
    record = training_record(path) or {}
    config = _read_config(path)
    config_dtype = config.get("torch_dtype") or config.get("dtype")
    if record.get("dtype") in DTYPES:
        dtype, dtype_from = record["dtype"], "hs3_training.json"
    elif config_dtype in DTYPES:
        dtype, dtype_from = config_dtype, "config.json"
    elif preset:
        dtype, dtype_from = preset.dtype, preset.dtype_from
    else:
        dtype, dtype_from = "float32", "default"
    if forced_dtype != "auto":
        dtype, dtype_from = forced_dtype, "eval.dtype"
    if _positive_int(record.get("seq_len")):
        seq_len, seq_len_from = record["seq_len"], "hs3_training.json"
    elif _positive_int(config.get("max_position_embeddings")):
        seq_len, seq_len_from = config["max_position_embeddings"], "config.json"
    elif preset:
        seq_len, seq_len_from = preset.seq_len, preset.seq_len_from
    else:
        seq_len, seq_len_from = None, "none"
    return Settings(dtype, seq_len, dtype_from, seq_len_from)


def target_settings(cfg, directory: Optional[str], target: Optional[str]) -> Settings:
    """model_settings of the model under test; a conf/model preset it is (target None, not a hub id) is
    the fallback."""
    preset = None
    if target is None and not is_hub_id(str(cfg.model.path)):
        source = f"conf/model ({cfg.model.name})"
        preset = Settings(str(cfg.model.dtype), int(cfg.train.seq_len), source, source)
    return model_settings(directory, cfg.eval.dtype, preset)


def generation_engine(cfg, target: Optional[str], settings: Optional[Settings] = None):
    """The engine that generates with the model under test: an endpoint over HTTP, else in process at
    the model's own dtype (target None: the configured model)."""
    from omegaconf import OmegaConf

    e = cfg.eval
    if target and is_endpoint(target):
        return HTTPEngine(target, e.api_model, e.concurrency, e.max_retries, e.request_timeout_s, e.api_key_env)
    directory = local_dir(cfg, target)
    settings = settings or target_settings(cfg, directory, target)
    model_cfg = OmegaConf.merge(cfg.model, {"dtype": settings.dtype})
    return HFEngine.load(model_cfg, target, e.batch_size)


def describe_target(cfg, target: Optional[str], engine=None, settings: Optional[Settings] = None) -> dict:
    """The model under test for report.json: what was named, the dir it is, its content fingerprint
    (recipes.provenance), the settings it was loaded at; an endpoint: its URL and the model it serves."""
    from recipes.provenance import describe_model

    spec = target or str(cfg.model.path)
    if is_endpoint(spec):
        return {"path": spec, "endpoint": True, "served_model": getattr(engine, "model", None) or cfg.eval.api_model,
                "fingerprint": None}
    directory = local_dir(cfg, target)
    described = describe_model(spec, directory)
    if settings:
        described.update({k: v for k, v in asdict(settings).items()})
    return described


def eval_task(cfg) -> str:
    """eval.task, or with `auto` the stage that trained the checkpoint (its hs3_training.json): feedback
    or select; anything else (an edit model, a base model, an endpoint) is scored as an edit model."""
    if cfg.eval.task != "auto":
        return str(cfg.eval.task)
    target = model_under_test(cfg, check=False)
    record = training_record(target) if target and not is_endpoint(target) and Path(target).is_dir() else None
    return record["stage"] if record and record.get("stage") in ("feedback", "select") else "edit"


def identity(cfg, target: Optional[str]) -> dict:
    """What names this eval's model in its out dir: a local path (resolved), an endpoint URL (and the
    model asked for), a hub id or a builtin/pkg model."""
    spec = target or str(cfg.model.path)
    if is_endpoint(spec):
        return {"model": spec, "api_model": cfg.eval.api_model}
    return {"model": str(Path(spec).resolve()) if Path(spec).exists() else spec}


def claim_out_dir(out: Path, owner: dict) -> None:
    """Refuse an out dir holding another model's eval (eval_model.json, or the report.json of an eval
    written before that file existed) or another stage's output; then record this eval's model there."""
    held = None
    if (out / OWNER_FILE).is_file():
        try:
            held = json.loads((out / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"out={out}: {OWNER_FILE} is unreadable; pass another out=DIR") from None
    elif (out / "report.json").is_file():
        try:
            model = json.loads((out / "report.json").read_text(encoding="utf-8"))["meta"]["model"]
            held = {"model": str(Path(model).resolve()) if Path(model).exists() else model}
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"out={out}: holds a report.json that names no model; pass another out=DIR") from None
    elif (out / "config.yaml").is_file() or (out / "final").exists():
        stage = None
        try:
            import yaml

            stage = (yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}).get("stage")
        except Exception:
            pass
        if stage != "eval":
            raise UserError(f"out={out}: holds the output of another stage ({stage or 'a final/ model'}); pass out=DIR")
    if isinstance(held, dict) and held.get("model") != owner["model"]:
        raise UserError(f"out={out} holds the eval of {held.get('model')}: scoring {owner['model']} there would "
                        f"overwrite it (leave out= unset for ${{run_dir}}/eval/NAME, or pass eval.name=NAME or out=DIR)")
    if isinstance(held, dict) and owner.get("api_model") and held.get("api_model") not in (None, owner["api_model"]):
        raise UserError(f"out={out} holds the eval of {held['model']} serving {held['api_model']}, not "
                        f"{owner['api_model']} (pass eval.name=NAME or out=DIR)")
    atomic_write_json(out / OWNER_FILE, owner)
