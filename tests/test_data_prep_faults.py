"""The data step against damaged outputs, odd bytes, faults of the file system and leftovers
(issue 11, items 5, 6, 7 and 9). Builds run in-process on tiny sources; a few run as the CLI for the
exit code and the one-line error."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from data_prep.build import build
from hs3.io import UserError
from tests.conftest import run_cli
from tests.test_data_prep_build import edit_row, quality_row, write_source


@pytest.fixture
def small_source(tmp_path) -> Path:
    return write_source(tmp_path / "src", {"edit/train": [edit_row(i) for i in range(3)],
                                           "edit/validation": [edit_row(10)],
                                           "edit_quality/train": [quality_row(i) for i in range(2)],
                                           "edit_quality/validation": [quality_row(10)]})


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ")
    return proc.stderr.strip()


# --- item 5: "up to date" checks the files, not only the manifest ---------------------------------

@pytest.mark.parametrize("damage", ["emptied", "deleted dir", "same size, other bytes"])
def test_a_damaged_build_is_not_up_to_date(small_source, tmp_path, damage):
    out = tmp_path / "data"
    build(str(small_source), out, progress=False)
    assert build(str(small_source), out, progress=False)["up_to_date"]
    if damage == "emptied":
        (out / "sft" / "train.jsonl").write_bytes(b"")
    elif damage == "deleted dir":
        shutil.rmtree(out / "pairs")
    else:
        data = (out / "sft" / "train.jsonl").read_bytes()
        (out / "sft" / "train.jsonl").write_bytes(data.replace(b"Better", b"BETTER"))
    if damage == "same size, other bytes":
        assert build(str(small_source), out, progress=False)["up_to_date"]  # sizes alone cannot tell
        with pytest.raises(UserError, match="sft/train.jsonl has another sha256"):
            build(str(small_source), out, progress=False, verify=True)
        proc = run_cli("-m", "data_prep", "--source", str(small_source), "--out", str(out), "--verify")
    else:
        proc = run_cli("-m", "data_prep", "--source", str(small_source), "--out", str(out))
    line = one_line_error(proc)
    assert "do not match its manifest" in line
    assert {"emptied": "sft/train.jsonl has 0 bytes", "deleted dir": "pairs/train.jsonl missing",
            "same size, other bytes": "sft/train.jsonl has another sha256"}[damage] in line


# --- item 6: outputs follow the umask -------------------------------------------------------------

def test_data_out_follows_the_umask(small_source, tmp_path):
    old = os.umask(0o022)
    try:
        build(str(small_source), tmp_path / "data", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o755  # mkdtemp alone makes 0700
    assert (tmp_path / "data" / "sft" / "train.jsonl").stat().st_mode & 0o777 == 0o644
