"""The upstream pins: one manifest (tests/upstream.toml), equal to what the Megatron engine's config
names, and a fetch script that checks what it brings."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile

import yaml

from tests.conftest import REPO_ROOT
from tests.fetch_upstream import manifest


def test_engine_config_names_the_pinned_commits():
    pins = manifest()
    engine = yaml.safe_load((REPO_ROOT / "conf" / "engine" / "megatron.yaml").read_text())["megatron"]
    assert engine["nemo_rl_commit"] == pins["nemo_rl"]["commit"]
    assert engine["megatron_bridge_commit"] == pins["megatron_bridge"]["commit"]


def test_a_wheel_with_another_digest_is_refused(tmp_path):
    """The fetch script installs nothing whose sha256 is not the pinned one (a local wheel dir stands in
    for PyPI: pip --find-links, no index)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "hs3_fake_pkg-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("hs3_fake_pkg/__init__.py", "X = 1\n")
        whl.writestr("hs3_fake_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: hs3-fake-pkg\nVersion: 1.0\n")
        whl.writestr("hs3_fake_pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr("hs3_fake_pkg-1.0.dist-info/RECORD", "")
    digest = hashlib.sha256((wheels / "hs3_fake_pkg-1.0-py3-none-any.whl").read_bytes()).hexdigest()
    script = '''
import sys, tests.fetch_upstream as f
from pathlib import Path
pins = {"fake": {"version": "1.0", "pypi": "hs3-fake-pkg==1.0", "wheel_sha256": sys.argv[1]}}
f.manifest = lambda: pins
sys.exit(f.main(["--quiet"]))
'''
    env = {"HS3_UPSTREAM_DIR": str(tmp_path / "up"), "PIP_FIND_LINKS": str(wheels), "PIP_NO_INDEX": "1",
           "PIP_CONSTRAINT": ""}
    run = lambda sha: subprocess.run([sys.executable, "-c", script, sha], cwd=REPO_ROOT, capture_output=True,
                                     text=True, timeout=300, env={**__import__("os").environ, **env})
    bad = run("0" * 64)
    assert bad.returncode == 1 and "is not the pinned" in bad.stderr
    assert not (tmp_path / "up" / "fake-wheel").exists()
    good = run(digest)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "up" / "fake-wheel" / "hs3_fake_pkg" / "__init__.py").read_text() == "X = 1\n"
