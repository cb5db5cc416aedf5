"""The Megatron-Bridge image (docker/Dockerfile.megatron_bridge) against what it installs: the pinned release
wheels (tests/upstream.toml, unpacked by tests/fetch_upstream.py) and the conversion scripts of the pinned
commit. Docker, enroot and NVIDIA's registry are not reachable here: the build itself is verified on a cluster
(docs/megatron.md); what can be checked without it is checked here. Issue 16, findings 9 and 10."""
from __future__ import annotations

import ast
import re
from email.parser import Parser
from pathlib import Path

import yaml

from recipes.config import REPO_ROOT, compose
from tests.fetch_upstream import manifest
from tests.upstream import source

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile.megatron_bridge"


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def wheel_metadata(wheel: Path, name: str):
    [dist_info] = wheel.glob(f"{name}-*.dist-info")
    return Parser().parsestr((dist_info / "METADATA").read_text())


def test_the_image_installs_the_pinned_wheels_and_says_which():
    """One pin for the image, the tests and the config: the Dockerfile's versions and sha256 are
    tests/upstream.toml's, the config names that version, and the image's label is what it reports (the build
    asserts megatron.bridge.__version__; the image once labelled v0.6.0 reported 0.6.1: its tag v0.6.0 is the
    commit that bumps package_info.py to 0.6.1)."""
    args, pins = dockerfile_args(), manifest()
    assert args["MEGATRON_BRIDGE_VERSION"] == pins["megatron_bridge"]["version"] == "0.6.2"
    assert args["MEGATRON_BRIDGE_SHA256"] == pins["megatron_bridge"]["wheel_sha256"]
    assert args["MEGATRON_CORE_VERSION"] == pins["megatron_core"]["version"]
    assert args["MEGATRON_CORE_SHA256"] == pins["megatron_core"]["wheel_sha256"]
    assert args["MEGATRON_BRIDGE_COMMIT"] == pins["megatron_bridge"]["commit"]
    engine = yaml.safe_load((REPO_ROOT / "conf" / "engine" / "megatron.yaml").read_text())["megatron"]
    assert engine["megatron_bridge_version"] == args["MEGATRON_BRIDGE_VERSION"]
    assert "assert (b.__version__, c.__version__) == ('${MEGATRON_BRIDGE_VERSION}', '${MEGATRON_CORE_VERSION}')" in DOCKERFILE.read_text()
    build = (REPO_ROOT / "docker" / "build_megatron_bridge.sh").read_text()
    assert "megatron-bridge-$VERSION-pytorch26.06.sqsh" in build
    assert compose("sft", ["engine=megatron"]).megatron.container.endswith(
        f"/megatron-bridge-{args['MEGATRON_BRIDGE_VERSION']}-pytorch26.06.sqsh")

    wheel = source("megatron_bridge", "wheel")
    info = (wheel / "megatron" / "bridge" / "package_info.py").read_text()
    assert re.search(r"^MINOR = 6\nPATCH = 2$", info, re.M)
    tagged = (source("megatron_bridge", "git") / "src" / "megatron" / "bridge" / "package_info.py").read_text()
    assert re.search(r"^MINOR = 6\nPATCH = 1$", tagged, re.M)  # what an image built from tag v0.6.0 reports


def test_the_wheels_fit_the_pytorch_image():
    """Requires-Python admits the 26.06 image's Python 3.12 (Megatron-Bridge's own Dockerfile.ci builds its
    venv there, /opt/venv/lib/python3.12); Transformer Engine is only an extra (the image has it); the one
    Requires-Dist without a wheel on PyPI, fast-hadamard-transform, is built from the git tag Megatron-Bridge's
    pyproject.toml names, before pip would try PyPI's incomplete sdist."""
    metadata = wheel_metadata(source("megatron_bridge", "wheel"), "megatron_bridge")
    assert metadata["Requires-Python"] in (">=3.12,<3.13", "<3.13,>=3.12")
    requires = metadata.get_all("Requires-Dist")
    assert not [r for r in requires if r.startswith("transformer-engine") and "extra ==" not in r]
    assert "fast-hadamard-transform>=1.1.0" in requires
    assert any(r.startswith("megatron-core[") for r in requires)  # unpinned: the Dockerfile pins it
    ci = (source("megatron_bridge", "git") / "docker" / "Dockerfile.ci").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.06-py3" in ci and "/opt/venv/lib/python3.12/site-packages" in ci
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.06-py3" in DOCKERFILE.read_text()
    pyproject = (source("megatron_bridge", "git") / "pyproject.toml").read_text()
    pin = '"fast-hadamard-transform @ git+https://github.com/Dao-AILab/fast-hadamard-transform.git@v1.1.0"'
    assert pin + "  # pin 1.1.0; PyPI sdist is incomplete" in pyproject
    text = DOCKERFILE.read_text()
    assert text.index("fast-hadamard-transform.git@v1.1.0") < text.index("pip install --no-cache-dir /tmp/wheels")
    core = wheel_metadata(source("megatron_core", "wheel"), "megatron_core")
    assert core["Requires-Python"] == ">=3.12"


def _bridge_imports(tree: ast.AST) -> set[tuple[str, str]]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron.bridge"):
            names |= {(node.module, alias.name) for alias in node.names}
    return names


def _defined(wheel: Path, module: str, name: str) -> bool:
    """`name` is a submodule of `module`, or bound at its top level (def, class, assignment, import)."""
    base = wheel.joinpath(*module.split("."))
    if (base / name).is_dir() or (base / f"{name}.py").is_file():
        return True
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, ast.Try):  # imports guarded by try/except
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in n.names)
                   for n in ast.walk(node)):
                return True
    return False


def test_what_runs_in_the_image_finds_the_names_it_imports_in_the_wheel():
    """The conversion scripts of the pinned commit (the image's /opt/Megatron-Bridge/scripts) and our sft
    wrapper import megatron.bridge names: each exists in the 0.6.2 wheel the image installs. And the recipe
    the engine config names is one the wheel exports."""
    wheel = source("megatron_bridge", "wheel")
    scripts = source("megatron_bridge", "git") / "scripts" / "conversion"
    wanted = set()
    for script in sorted(scripts.glob("*.py")):
        wanted |= _bridge_imports(ast.parse(script.read_text()))
    ours = _bridge_imports(ast.parse((REPO_ROOT / "recipes" / "megatron" / "bridge_sft.py").read_text()))
    assert ("megatron.bridge.training.finetune", "finetune") in ours and ("megatron.bridge", "AutoBridge") in wanted
    missing = sorted(f"{m}.{n}" for m, n in wanted | ours if not _defined(wheel, m, n))
    assert not missing, missing
    recipe = compose("sft", ["engine=megatron"]).megatron.megatron_bridge_recipe
    assert _defined(wheel, "megatron.bridge.recipes.llama", recipe)


def test_no_file_names_a_path_of_the_machine_it_was_written_on():
    """A test that names a directory of one machine (a local mirror, a home) skips or fails everywhere else
    (issue 16, finding 11): absolute paths in the code and tests must be the repo's, the system's, or a
    documented default (/shared, /lustre, /opt inside the images), never one that exists only here. Every
    tracked text file is read: code, tests, docs, README, launch.sh, .ci."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    allowed = ("/tmp", "/usr", "/etc", "/opt", "/dev", "/proc", "/bin", "/sbin", "/lib", "/var", "/run", "/sys",
               "/shared", "/lustre", "/images", "/c", "/path", "/models", "/data", "/checkpoints")
    found = []
    for name in files:
        path = REPO_ROOT / name
        if path.suffix not in (".py", ".yaml", ".sh", ".toml", ".md", ".txt", ".cfg") and path.name not in (
                "launch.sh", "run", "Dockerfile") or not path.is_file():
            continue
        for quoted in re.findall(r"""["'`(=\s](/[A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+-]+)+)""", path.read_text(errors="replace")):
            top = "/" + quoted.split("/")[1]
            if quoted.startswith(str(REPO_ROOT)) or quoted.startswith(allowed) or top in allowed:
                continue
            if Path(top).exists():  # a directory of this machine outside the system's own
                found.append(f"{name}: {quoted}")
    assert not found, found
