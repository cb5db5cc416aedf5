"""The software a run used, for its records (final/hs3_training.json, summary.json): the versions of the
packages that decide what a stage computes, and how the installed packages differ from the versions the
tests passed with (constraints.txt at the repository root; `./launch.sh setup` installs those)."""
from __future__ import annotations

import functools
import hashlib
import platform
import re
from importlib import metadata
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
KEY_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "tokenizers",
                "megatron-core", "vllm")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_key(name: str) -> str:
    """How tested_versions names a package: lower case, '-' for '_' (transformers, rouge-score)."""
    return name.lower().replace("_", "-")


def tested_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{package_key: version} pinned in constraints.txt ({} when there is none, e.g. an installed wheel)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    return {package_key(m.group(1)): m.group(2) for line in lines if (m := _PIN.match(line.strip()))}


@functools.lru_cache(maxsize=None)
def software_versions(constraints_file: Path = CONSTRAINTS) -> dict:
    """{"python", "packages": {name: version} (the key packages installed), "constraints": {"sha256",
    "differs": {name: [installed, tested]}} (None without a constraints file)}."""
    packages = {name: v for name in KEY_PACKAGES if (v := _installed(name))}
    tested = tested_versions(constraints_file)
    constraints = None
    if tested:
        differs = {}
        for name, version in tested.items():
            installed = _installed(name)
            if installed is not None and installed != version:
                differs[name] = [installed, version]
        constraints = {"sha256": hashlib.sha256(constraints_file.read_bytes()).hexdigest(), "differs": differs}
    return {"python": platform.python_version(), "packages": packages, "constraints": constraints}
