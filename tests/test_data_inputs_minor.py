"""The data step's minor findings of issue 18, item 14: a data OUT that is a symlink, another host's stale
temp dir, duplicate JSON keys, a UTF-16 file. (final/ as a symlink: tests/test_out_dir.py.)"""
from __future__ import annotations

import codecs
import json
import platform

import pytest

from data_prep.build import build
from hs3.io import UserError, read_jsonl
from tests.conftest import run_cli
from tests.test_data_prep_build import edit_row, quality_row, write_source


def _source(tmp_path, extra_edit_lines=()):
    return write_source(tmp_path / "src", {
        "edit/train": [edit_row(0), edit_row(1), *extra_edit_lines], "edit/validation": [edit_row(2)],
        "edit_quality/train": [quality_row(0)], "edit_quality/validation": [quality_row(1)]})


def test_an_out_that_is_a_symlink_builds_through_it_and_reruns_up_to_date(tmp_path):
    """Before: every run ended in 'another process wrote it while this build ran' (rmdir on the link)."""
    src = _source(tmp_path)
    target = tmp_path / "scratch" / "data"
    target.mkdir(parents=True)
    link = tmp_path / "run" / "data"
    link.parent.mkdir()
    link.symlink_to(target)
    first = build(str(src), link, progress=False)
    assert link.is_symlink() and (target / "manifest.json").is_file()
    assert first["counts"]["edit/train"]["used"] == 2
    again = build(str(src), link, progress=False)
    assert again.get("up_to_date") is True


def test_a_stale_temp_dir_of_another_host_is_reported_not_kept_silently(tmp_path, capsys):
    src = _source(tmp_path)
    out = tmp_path / "data"
    other = tmp_path / ".data.tmp-otherhost-4242-abcd"
    other.mkdir()
    (other / "partial.jsonl").write_text("{}\n")
    mine_dead = tmp_path / f".data.tmp-{platform.node()}-999999999-abcd"  # this host, a PID that cannot run
    mine_dead.mkdir()
    build(str(src), out, progress=False)
    err = capsys.readouterr().err
    assert f"data: left alone: {other} is the temp dir of a build on another host" in err
    assert other.is_dir() and (other / "partial.jsonl").is_file()  # another host's: never deleted
    assert not mine_dead.exists()  # this host's dead build's: removed, as before


def test_a_row_with_a_key_twice_is_rejected_with_the_reason(tmp_path):
    row = json.dumps(edit_row(5))
    doubled = row[:-1] + ', "domain": "general"}'  # the key again: json.loads would keep only this one
    assert doubled.count('"domain"') == 2
    src = _source(tmp_path, [doubled.encode()])
    out = tmp_path / "data"
    manifest = build(str(src), out, progress=False)
    counts = manifest["counts"]["edit/train"]
    assert (counts["read"], counts["used"], counts["rejected"]) == (3, 2, 1)
    rejected = read_jsonl(out / "rejected.jsonl")
    assert len(rejected) == 1 and "duplicate key 'domain'" in json.dumps(rejected[0]), rejected


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_utf16_file_is_one_clear_error_not_rejected_rows(tmp_path, encoding):
    """Before: UTF-16 became one rejected row per line and exit 0."""
    src = _source(tmp_path)
    path = src / "edit" / "train.jsonl"
    path.write_bytes(path.read_text(encoding="utf-8").encode(encoding))
    with pytest.raises(UserError, match=r"it is UTF-16 or UTF-32 text \(or binary\), not UTF-8 JSON lines; save it as UTF-8"):
        build(str(src), tmp_path / "data", progress=False)
    proc = run_cli("-m", "data_prep", "--source", str(src), "--out", str(tmp_path / "data2"), timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "UTF-16 or UTF-32" in proc.stderr and not (tmp_path / "data2").exists()


def test_a_utf8_bom_is_still_fine(tmp_path):
    src = _source(tmp_path)
    path = src / "edit" / "train.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    assert build(str(src), tmp_path / "data", progress=False)["counts"]["edit/train"]["used"] == 2
