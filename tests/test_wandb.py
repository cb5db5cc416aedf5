"""W&B logging (issue 19 item 10): the wandb extra, wandb's own login (no WANDB_API_KEY requirement;
offline mode needs no login at all), the project and run name from the config, and no key written
anywhere. wandb runs for real, offline (its run files under OUT/wandb)."""
from __future__ import annotations

import importlib.util

import pytest

from recipes.config import ConfigError, compose

from .conftest import run_cli

pytestmark = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                reason="wandb is not installed (EXTRAS=...,wandb ./launch.sh setup)")
KEY = "f" * 40  # the shape of a W&B API key


def test_login_through_netrc_or_offline_mode_no_key_variable_needed(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match="needs WANDB_API_KEY in the environment or a `wandb login`"):
        compose("sft", ["train.report_to=wandb"])
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    (tmp_path / "netrc").chmod(0o600)
    assert compose("sft", ["train.report_to=wandb"]).train.report_to == "wandb"  # `wandb login`'s entry
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert compose("sft", ["train.report_to=wandb"]).train.report_to == "wandb"


def test_an_offline_run_logs_project_and_run_name_and_writes_no_key(tmp_path, edit_data_dir):
    run = tmp_path / "my_run"
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": KEY, "WANDB_SILENT": "true", "HOME": str(tmp_path / "home"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")}
    proc = run_cli("-m", "launcher", "sft", f"run_dir={run}", f"data={edit_data_dir}", "train.max_steps=2",
                   "train.report_to=wandb", "train.wandb_project=hs3-test-project", env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "sft"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb dir"
    log = next(runs[0].glob("*.wandb")).read_bytes()  # wandb's own record of the run (protobuf)
    assert b"hs3-test-project" in log and b"my_run-sft" in log  # project and run name from the config
    assert b"train/loss" in log
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key was written to {path}"
    assert "wandb_project: hs3-test-project" in (out / "config.yaml").read_text()
