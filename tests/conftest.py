"""Shared fixtures. No test touches the network: models are built here from a config."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "data_prep" / "sample"

# Keep CPU tests predictable on a 2-core machine, and never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny random Llama (with its Llama-3-format tokenizer), built once per session."""
    from recipes.config import compose
    from recipes.models import resolve_model_path

    return Path(resolve_model_path(compose("sft", []).model))


def run_cli(*args: str, cwd: Path = REPO_ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m ...` the way a user would, capturing output."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )
