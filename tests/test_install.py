"""Reproducible installs (issue 19 item 7): constraints.txt holds the exact versions the tests pass with,
`./launch.sh setup` installs them (UPGRADE=1 would not), and every run records the versions it ran with."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from importlib import metadata

import pytest

from hs3.versions import KEY_PACKAGES, software_versions, tested_versions

from .conftest import REPO_ROOT


def test_the_constraints_pin_what_the_tests_run_with():
    """Every package constraints.txt pins is installed at that version here: the suite passing means those
    versions pass (a stale lock fails here: UPGRADE=1 ./launch.sh setup, ./launch.sh test, ./launch.sh lock)."""
    pins = tested_versions()
    assert {"transformers", "trl", "peft", "accelerate", "datasets", "omegaconf"} <= set(pins)
    assert "torch" not in pins and "helpsteer3-edit" not in pins  # TORCH_SPEC picks torch's build
    versions = software_versions()
    assert versions["constraints"]["differs"] == {}, versions["constraints"]["differs"]
    for name in KEY_PACKAGES:
        try:
            assert versions["packages"].get(name) == metadata.version(name)
        except metadata.PackageNotFoundError:
            assert name not in versions["packages"]


def test_a_version_other_than_the_tested_one_is_recorded(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("# header\ntransformers==0.0.1\nno-such-package==1.0\nrich==%s ; python_version >= '3'\n"
                    % metadata.version("rich"))
    versions = software_versions(lock)
    assert versions["constraints"]["differs"] == {"transformers": [metadata.version("transformers"), "0.0.1"]}


def test_every_training_record_and_summary_carries_the_versions(tmp_path, tiny_model_dir):
    from recipes.config import compose
    from recipes.training import write_summary, write_training_record

    cfg = compose("sft", [f"run_dir={tmp_path}"])
    (tmp_path / "sft" / "final").mkdir(parents=True)
    record = write_training_record(tmp_path / "sft" / "final", cfg, ["edit/train"])
    write_summary(cfg, "eval_loss", 1.0, time.monotonic())
    written = json.loads((tmp_path / "sft" / "final" / "hs3_training.json").read_text())
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    for versions in (written["versions"], summary["versions"], record["versions"]):
        assert versions["packages"]["transformers"] == metadata.version("transformers")
        assert versions["constraints"]["sha256"] and versions["constraints"]["differs"] == {}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_setup_in_a_fresh_clone_installs_the_tested_versions(tmp_path):
    """git clone, then ./launch.sh setup (the default, lean extras) into a new venv: what pip installed is
    what constraints.txt pins; a second setup does nothing. Uses pip's own configuration (here: a local
    wheel directory and package index, no network)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True, timeout=300)
    venv = tmp_path / "venv"
    env = {**os.environ, "VENV": str(venv)}
    env.pop("EXTRAS", None)
    first = subprocess.run([str(clone / "launch.sh"), "setup"], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=3000)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "extras hf,eval, the tested versions (constraints.txt)" in first.stderr
    freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    installed = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
                 for line in freeze.splitlines() if "==" in line}
    pins = tested_versions(clone / "constraints.txt")
    wrong = {name: (installed[name], pins[name]) for name in installed if name in pins and installed[name] != pins[name]}
    assert wrong == {}
    assert {"transformers", "trl", "peft", "torch"} <= set(installed) and installed["torch"].startswith("2.13.0")
    assert "pytest" not in installed and "megatron-core" not in installed  # lean: the test extras are opt-in
    again = subprocess.run([str(clone / "launch.sh"), "setup"], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and again.stderr == ""
    helped = subprocess.run([str(venv / "bin" / "python"), "-m", "launcher", "sft", "--help"], cwd=clone,
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "train.lr" in helped.stdout
    shutil.rmtree(venv)  # ~3 GB


def test_the_data_and_eval_image_installs_the_tested_versions(tmp_path):
    """docker/Dockerfile.hs3's install step, run on a build context made as docker/build_hs3.sh makes it: each
    requirement of pyproject.toml's core, hf and eval lists comes out pinned to constraints.txt's version;
    torch, which constraints.txt leaves out, keeps its bound (the NVIDIA image's own build stays)."""
    import re

    from launcher.image_probe import requirements

    script = (REPO_ROOT / "docker" / "build_hs3.sh").read_text()
    context = tmp_path / "context"  # what its mktemp -d makes
    context.mkdir()
    build = "\n".join(line for line in script.splitlines() if line.startswith(("mkdir \"$CONTEXT", "cp \"$ROOT")))
    subprocess.run(["bash", "-euc", build], env={**os.environ, "ROOT": str(REPO_ROOT), "CONTEXT": str(context)},
                   check=True)
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile.hs3").read_text()
    for sources, dest in re.findall(r"^COPY (.+) (/tmp/hs3/\S*)$", dockerfile, flags=re.M):
        for src in sources.split():  # everything the Dockerfile copies is in the context build_hs3.sh makes
            assert (context / src).is_file(), src
    run = re.search(r"^RUN python (/tmp/hs3/\S+) --requirements > /tmp/hs3/requirements.txt", dockerfile, flags=re.M)
    proc = subprocess.run(["python3", run.group(1).replace("/tmp/hs3", str(context)), "--requirements"],
                          capture_output=True, text=True, check=True)  # a bare python: the image before the install
    pins = tested_versions()
    expected = [r if r.startswith("torch") else f"{r.split('>')[0]}=={pins[r.split('>')[0]]}" for r in requirements()]
    assert proc.stdout.split() == expected
    assert "transformers==" + metadata.version("transformers") in expected
