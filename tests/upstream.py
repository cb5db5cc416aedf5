"""The pinned upstream sources (tests/upstream.toml) for a test: the unpacked tree, or a skip that names
the script that brings it (`./launch.sh test` counts these skips in its last line)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fetch_upstream import STAMP, manifest, upstream_dir

SKIP_PREFIX = "upstream source absent"


def source(name: str, kind: str) -> Path:
    """tests/upstream.toml's NAME as KIND (wheel: the unpacked release wheel; git: the pinned commit's
    files), or skip."""
    pins = manifest()
    if name not in pins:
        raise KeyError(f"{name} is not in tests/upstream.toml")
    path = upstream_dir() / f"{name}-{kind}"
    if not (path / STAMP).is_file():
        pytest.skip(f"{SKIP_PREFIX}: {name} ({kind}) -- run python tests/fetch_upstream.py {name}")
    return path


def on_path(monkeypatch, name: str, kind: str, subdir: str = "") -> Path:
    """source() put first on sys.path for this test (import the upstream package from it)."""
    root = source(name, kind) / subdir
    monkeypatch.syspath_prepend(str(root))
    return root


def pin(name: str) -> dict:
    return manifest()[name]


__all__ = ["SKIP_PREFIX", "on_path", "pin", "source"]
