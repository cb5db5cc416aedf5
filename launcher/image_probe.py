"""`python -m launcher.image_probe`: run inside an image (by `./launch.sh doctor`, as a one-task job) to tell
whether our code can run there. Standard library only, so that it runs where our dependencies are missing.

Prints one JSON object: {"python": VERSION, "requirements": {REQUIREMENT: {"found": VERSION | null, "ok": bool,
"tested": VERSION | null}},
"imports": {MODULE: null | "error"}}. The requirements are pyproject.toml's (the core list and the hf and
eval extras); each also names the version the test suite passed with (constraints.txt: "tested").

`python launcher/image_probe.py --requirements` prints what docker/Dockerfile.hs3 installs: each of those
requirements pinned to its tested version (torch, which constraints.txt leaves out, stays the image's own).
"""
from __future__ import annotations

import importlib
import json
import re
import sys
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
sys.path.insert(0, str(PYPROJECT.parent))
from hs3.versions import package_key, tested_versions  # noqa: E402 (standard library only, like this file)

EXTRAS = ("hf", "eval")
# what the data and eval stages import when their job starts (python -m launcher.run CONFIG)
MODULES = ("launcher.run", "recipes.config", "recipes.training", "data_prep.build", "eval.run")


def requirements() -> list[str]:
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return list(project["dependencies"]) + [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]


def requirement_name(requirement: str) -> str:
    """The package a requirement names (`transformers>=5.24` -> transformers)."""
    return re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0]


def pinned_requirements() -> list[str]:
    """Each requirement at its tested version, where constraints.txt has one that the requirement allows."""
    tested = tested_versions()
    out = []
    for requirement in requirements():
        name = requirement_name(requirement)
        version = tested.get(package_key(name))
        out.append(f"{name}=={version}" if version and satisfied(requirement, version) else requirement)
    return out


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0].split("a")[0].split("rc")[0])[:4])


def satisfied(requirement: str, found: str) -> bool:
    """Every `>=`, `==`, `<` bound of a plain `name>=X[,<Y]` requirement (pyproject's form)."""
    try:
        from packaging.requirements import Requirement

        return Requirement(requirement).specifier.contains(found, prereleases=True)
    except ImportError:
        pass
    for op, bound in re.findall(r"(>=|==|<=|<|>)\s*([\w.]+)", requirement):
        have, want = _release(found), _release(bound)
        if not {">=": have >= want, "==": have == want, "<=": have <= want, "<": have < want, ">": have > want}[op]:
            return False
    return True


def probe() -> dict:
    report: dict = {"python": sys.version.split()[0], "requirements": {}, "imports": {}}
    tested = tested_versions()
    for requirement in requirements():
        name = requirement_name(requirement)
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            found = None
        report["requirements"][requirement] = {"found": found, "ok": found is not None and satisfied(requirement, found),
                                               "tested": tested.get(package_key(name))}
    for package in MODULES:
        try:
            importlib.import_module(package)
            report["imports"][package] = None
        except Exception as exc:  # noqa: BLE001 (any failure is the answer)
            report["imports"][package] = f"{type(exc).__name__}: {exc}"
    return report


if __name__ == "__main__":
    if sys.argv[1:] == ["--requirements"]:
        print("\n".join(pinned_requirements()))
        sys.exit(0)
    print("HS3_IMAGE_PROBE " + json.dumps(probe()), flush=True)
