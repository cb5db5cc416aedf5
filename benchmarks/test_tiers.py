"""Time the test tiers: `./launch.sh test fast` (the quick tier) and, with --full, `./launch.sh test` (everything).

    .venv/bin/python benchmarks/test_tiers.py [--full] [--measure] [--threshold 8] [-- PYTEST ARGS]

Runs each tier as the launcher does (`python -m pytest -m "not slow and not slurm and not gpu"` for fast,
plain `python -m pytest` for full) in this checkout's .venv, and prints per tier: wall time, tests passed /
failed / skipped, and the machine's load average before and after (other work on the machine slows every
figure). With --full, the ratio fast/full. The fast tier's target is under 3 minutes on 2 cores; this script
prints the figure, it does not assert it.

--measure: the fast tier with per-test durations (JUnit XML), printing the tests over --threshold seconds:
the candidates for tests/conftest.py's SLOW_TESTS (docs/testing.md, "Keeping the fast tier fast").
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAST = ["-m", "not slow and not slurm and not gpu"]


def run_tier(name: str, args: list[str], extra: list[str], junit: Path | None = None) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, *extra]
    if junit:
        command.append(f"--junitxml={junit}")
    load_before = os.getloadavg()
    start = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - start
    load_after = os.getloadavg()
    tail = proc.stdout.strip().splitlines()
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed|error)", line)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    return {"tier": name, "wall_s": wall, "counts": counts, "summary": summary, "rc": proc.returncode,
            "load": (load_before, load_after), "output": proc.stdout[-3000:]}


def show(result: dict) -> None:
    c = result["counts"]
    b, a = result["load"]
    print(f"{result['tier']:>5}: {result['wall_s']:7.1f} s  {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
          f"{c.get('skipped', 0)} skipped, {c.get('deselected', 0)} deselected  (exit {result['rc']}; load average "
          f"{b[0]:.1f} before, {a[0]:.1f} after, on {os.cpu_count()} CPUs)")


def slowest(junit: Path, threshold: float) -> list[tuple[float, str]]:
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        seconds = float(case.get("time", 0))
        if seconds >= threshold:
            module = case.get("classname", "").replace(".", "/") + ".py"
            rows.append((seconds, f"{module}::{case.get('name')}"))
    return sorted(rows, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also time the whole suite (what CI runs)")
    parser.add_argument("--measure", action="store_true", help="per-test durations of the fast tier")
    parser.add_argument("--threshold", type=float, default=8.0, help="--measure: list tests at least this slow (s)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "fast.xml" if args.measure else None
        fast = run_tier("fast", FAST, args.pytest_args, junit)
        show(fast)
        if fast["rc"] not in (0, 1):
            print(fast["output"])
        if junit and junit.is_file():
            print(f"fast-tier tests taking >= {args.threshold:g} s (candidates for SLOW_TESTS in tests/conftest.py):")
            for seconds, nodeid in slowest(junit, args.threshold):
                print(f"  {seconds:7.1f} s  {nodeid}")
    if args.full:
        full = run_tier("full", [], args.pytest_args)
        show(full)
        print(f"ratio fast/full: {fast['wall_s'] / full['wall_s']:.2f} (baseline: the full suite, run right after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
