"""The data step against hostile input (issue 11): at least 60 malformed inputs, rows and files. For
every one the outcome is one of two: a build whose accounting holds (read = used + rejected in every
split, the bad row among the rejected with a reason; nothing bare like NaN in any output), or a one-line
error (exit 2 from the CLI, one line and no traceback). Builds run in-process; a few run as the CLI."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.build import build
from hs3.io import UserError, read_jsonl
from tests.conftest import REPO_ROOT, run_cli
from tests.test_data_prep_build import edit_row, quality_row, write_source

GOOD = json.dumps(edit_row(0)).encode()


def _edit(**changes) -> bytes:
    return json.dumps(edit_row(1, **changes)).encode()


def _quality(**changes) -> bytes:
    return json.dumps(quality_row(1, **changes)).encode()


def _drop(row: dict, key: str) -> bytes:
    row = dict(row)
    row.pop(key)
    return json.dumps(row).encode()


def _deep(n: int) -> bytes:
    return b'{"domain": ' + b"[" * n + b"]" * n + b"}"


# name -> (subset, the bad line). Each goes into that subset's train split beside one good row.
BAD_ROWS = {
    "not json": ("edit", b"{"),
    "truncated object": ("edit", GOOD[:-5]),
    "empty object": ("edit", b"{}"),
    "array": ("edit", b"[1, 2]"),
    "string": ("edit", b'"row"'),
    "number": ("edit", b"5"),
    "null": ("edit", b"null"),
    "true": ("edit", b"true"),
    "invalid utf-8": ("edit", b'{"domain": "\xff\xfe"}'),
    "lone surrogate": ("edit", _edit(domain="x").replace(b'"x"', b'"\\ud800"')),
    "nested 1000 deep": ("edit", _deep(1000)),
    "nested 100000 deep": ("edit", _deep(100_000)),
    "nested 40 deep": ("edit", _deep(40)),
    "NaN": ("edit", GOOD[:-1] + b', "score": NaN}'),
    "Infinity": ("edit", GOOD[:-1] + b', "score": Infinity}'),
    "-Infinity": ("edit", GOOD[:-1] + b', "score": -Infinity}'),
    "1e400": ("edit", GOOD[:-1] + b', "score": 1e400}'),
    "context a string": ("edit", _edit(context="hi")),
    "context empty": ("edit", _edit(context=[])),
    "context turn a string": ("edit", _edit(context=["hi"])),
    "context turn without role": ("edit", _edit(context=[{"content": "hi"}])),
    "context turn without content": ("edit", _edit(context=[{"role": "user"}])),
    "context role unknown": ("edit", _edit(context=[{"role": "wizard", "content": "hi"}])),
    "context content an int": ("edit", _edit(context=[{"role": "user", "content": 5}])),
    "context starts with assistant": ("edit", _edit(context=[{"role": "assistant", "content": "a"},
                                                            {"role": "user", "content": "b"}])),
    "context ends with assistant": ("edit", _edit(context=[{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}])),
    "context roles repeat": ("edit", _edit(context=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])),
    "original_response missing": ("edit", _drop(edit_row(1), "original_response")),
    "original_response an int": ("edit", _edit(original_response=3)),
    "original_response blank": ("edit", _edit(original_response="   \n")),
    "edited_response missing": ("edit", _drop(edit_row(1), "edited_response")),
    "edited_response empty": ("edit", _edit(edited_response="")),
    "edited_response a list": ("edit", _edit(edited_response=["a"])),
    "feedback a string": ("edit", _edit(feedback="fix it")),
    "feedback items ints": ("edit", _edit(feedback=[1, 2])),
    "feedback item null": ("edit", _edit(feedback=["a", None])),
    "domain a number": ("edit", _edit(domain=7)),
    "language null": ("edit", _edit(language=None)),
    "change_summary a dict": ("edit", _edit(change_summary={"a": 1})),
    "trailing garbage": ("edit", GOOD + b" x"),
    "two objects on a line": ("edit", GOOD + GOOD),
    "BOM inside the file": ("edit", b"\xef\xbb\xbf" + GOOD),
    "NUL bytes in text": ("edit", _edit(original_response="a\u0000b")),
    "huge text": ("edit", _edit(original_response="x" * 1_000_000)),
    "unknown keys": ("edit", _edit(extra={"nested": [1, 2, {"k": "v"}]})),
    "duplicate keys": ("edit", GOOD[:-1] + b', "domain": "dup"}'),
    "right-to-left and emoji": ("edit", _edit(original_response="\u202eabc \U0001f600")),
    "control characters": ("edit", _edit(original_response="\x1b[31mred\x07")),
    "quality good missing": ("edit_quality", _drop(quality_row(1), "good_edited_response")),
    "quality bad an int": ("edit_quality", _quality(bad_edited_response=3)),
    "quality good equals bad": ("edit_quality", _quality(good_edited_response="same", bad_edited_response="same")),
    "quality feedback missing": ("edit_quality", _drop(quality_row(1), "feedback")),
    "quality not an object": ("edit_quality", b"[]"),
    "quality NaN": ("edit_quality", _quality()[:-1] + b', "x": NaN}'),
}


def assert_accounted(manifest: dict, out: Path) -> None:
    for split, counts in manifest["counts"].items():
        assert counts["read"] == counts["used"] + counts["rejected"], (split, counts)
    for path in out.rglob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            json.loads(line, parse_constant=lambda name: pytest.fail(f"{path}: bare {name} in {line[:200]}"))


@pytest.mark.parametrize("name", BAD_ROWS)
def test_a_bad_row_is_rejected_and_counted(name, tmp_path):
    subset, line = BAD_ROWS[name]
    good = {"edit": GOOD, "edit_quality": json.dumps(quality_row(0)).encode()}
    splits = {f"{s}/train": [good[s]] for s in good}
    splits[f"{subset}/train"] = [good[subset], line]
    src = write_source(tmp_path / "src", splits)
    manifest = build(str(src), tmp_path / "out", progress=False)
    assert_accounted(manifest, tmp_path / "out")
    counts = manifest["counts"][f"{subset}/train"]
    assert counts["read"] == 2, counts  # one line is one row: nothing lost, nothing split
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert counts["rejected"] == len(rejected) <= 1
    for row in rejected:
        assert row["row"] == 1 and row["reason"], row


# File-level inputs that still build: (name, how to write edit/train's bytes, rows expected read and used)
GOOD2 = json.dumps(edit_row(5)).encode()
ODD_FILES = {
    "UTF-8 BOM at the start": (b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD2 + b"\n", 2, 2),
    "CR-only line ends": (GOOD + b"\r" + GOOD2 + b"\r", 2, 2),
    "CRLF line ends": (GOOD + b"\r\n" + GOOD2 + b"\r\n", 2, 2),
    "no final newline": (GOOD + b"\n" + GOOD2, 2, 2),
    "blank lines between rows": (b"\n\n" + GOOD + b"\n   \n\t\n" + GOOD2 + b"\n\n", 2, 2),
    "empty file": (b"", 0, 0),
    "only whitespace": (b" \n\t\n", 0, 0),
    "a NUL byte line": (GOOD + b"\n\x00\n" + GOOD2 + b"\n", 3, 2),
}


@pytest.mark.parametrize("name", ODD_FILES)
def test_odd_files_build_with_every_row_accounted(name, tmp_path):
    data, read, used = ODD_FILES[name]
    src = write_source(tmp_path / "src", {})
    (src / "edit" / "train.jsonl").write_bytes(data)
    manifest = build(str(src), tmp_path / "out", progress=False)
    assert_accounted(manifest, tmp_path / "out")
    counts = manifest["counts"]["edit/train"]
    assert (counts["read"], counts["used"]) == (read, used), counts


def one_line(exc: UserError) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text and text, text
    return text


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root")


# File and OUT faults that must end as one line (the build raises UserError; the CLI exits 2).
def _corrupt_gz(src, out):
    (src / "edit" / "train.jsonl").unlink()
    (src / "edit" / "train.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")


def _truncated_gz(src, out):
    (src / "edit" / "train.jsonl").unlink()
    (src / "edit" / "train.jsonl.gz").write_bytes(gzip.compress(GOOD * 50)[:40])


def _unreadable(src, out):
    (src / "edit" / "train.jsonl").unlink()
    (src / "edit" / "train.jsonl").symlink_to("/proc/self/mem")  # reading it fails (EIO), even as root


def _split_is_a_dir(src, out):
    (src / "edit" / "train.jsonl").unlink()
    (src / "edit" / "train.jsonl").mkdir()


def _missing_split(src, out):
    (src / "edit_quality" / "validation.jsonl").unlink()


def _parent_is_a_file(src, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.parent.rmdir()
    out.parent.write_text("a file")


def _out_is_a_file(src, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("a file")


def _foreign_manifest_list(src, out):
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("[1, 2, 3]")


def _foreign_manifest_tool(src, out):
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"tool": "data_prep"}))


def _foreign_manifest_deep(src, out):
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def _foreign_files(src, out):
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")


def _read_only_out(src, out):
    _mount_tmpfs(out.parent, "size=1m")
    subprocess.run(["mount", "-o", "remount,ro", str(out.parent)], check=True)


def _full_disk(src, out):
    _mount_tmpfs(out.parent, "size=16k")
    (src / "edit" / "train.jsonl").write_bytes(b"\n".join(json.dumps(edit_row(i, original_response="y" * 2000)).encode()
                                                          for i in range(40)))


FAULTS = {
    "corrupt gzip": (_corrupt_gz, "cannot read"),
    "truncated gzip": (_truncated_gz, "cannot read"),
    "unreadable input file": (_unreadable, "cannot read"),
    "a split that is a directory": (_split_is_a_dir, "not found"),
    "a missing split": (_missing_split, "edit_quality/validation.jsonl.gz (or .jsonl) not found"),
    "OUT under a file": (_parent_is_a_file, "cannot create it"),
    "OUT is a file": (_out_is_a_file, "exists and is not a directory"),
    "foreign manifest (a list)": (_foreign_manifest_list, "holds no data_prep build"),
    "foreign manifest (ours in name only)": (_foreign_manifest_tool, "holds no data_prep build"),
    "foreign manifest (deep)": (_foreign_manifest_deep, "holds no data_prep build"),
    "foreign files": (_foreign_files, "holds no data_prep build"),
    "read-only OUT": (_read_only_out, "cannot create it: Read-only file system"),
    "full disk": (_full_disk, "the build needs about"),
}


@pytest.mark.parametrize("name", FAULTS)
def test_a_fault_is_one_line_and_leaves_nothing(name, tmp_path):
    make, message = FAULTS[name]
    src = write_source(tmp_path / "src", {"edit/train": [GOOD]})
    out = tmp_path / "outside" / "data"
    try:
        make(src, out)
        with pytest.raises(UserError) as caught:
            build(str(src), out, progress=False)
        assert message in one_line(caught.value), caught.value
        if out.parent.is_dir():
            assert not list(out.parent.glob(".data.tmp-*"))  # no temp dir left behind
    finally:
        if name in ("read-only OUT", "full disk"):
            unmounted = subprocess.run(["umount", str(out.parent)], capture_output=True, text=True)
            if unmounted.returncode:  # busy: a file the build left open; detach it anyway, then fail
                subprocess.run(["umount", "-l", str(out.parent)], capture_output=True)
            assert unmounted.returncode == 0, f"the build left a file open on {out.parent}: {unmounted.stderr}"


@pytest.mark.parametrize("args,message", [
    (["--feedback-orders", "bogus"], "--feedback-orders"),
    (["--workers", "0"], "--workers 0: must be >= 1"),
    (["--subsets", "edit,bogus"], "bogus"),
    (["--source", "/nonexistent/src"], "no such directory"),
    (["--max-seq-len", "-3"], "max-seq-len"),
])
def test_bad_options_exit_2_with_one_line(args, message, tmp_path):
    src = write_source(tmp_path / "src", {"edit/train": [GOOD]})
    proc = run_cli("-m", "data_prep", "--source", str(src), "--out", str(tmp_path / "out"), "--no-progress", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr


def test_cli_fault_exits_2_with_one_line(tmp_path):
    src = write_source(tmp_path / "src", {"edit/train": [GOOD]})
    _unreadable(src, None)
    proc = run_cli("-m", "data_prep", "--source", str(src), "--out", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: cannot read ")


def test_a_file_too_large_for_the_limit_is_one_line_and_leaves_nothing(tmp_path):
    """EFBIG (RLIMIT_FSIZE; Python ignores SIGXFSZ) while writing: exit 2, one line, no temp dir."""
    import resource

    src = write_source(tmp_path / "src", {"edit/train": [json.dumps(edit_row(i, original_response="y" * 2000)).encode()
                                                         for i in range(40)]})
    proc = subprocess.run([sys.executable, "-m", "data_prep", "--source", str(src), "--out", str(tmp_path / "data"),
                           "--no-progress"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "writing failed: File too large" in proc.stderr and "the temp dir" in proc.stderr
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data.tmp-*"))


def test_two_builds_into_one_out_at_once(tmp_path):
    """Both start on an empty OUT; one builds it, the other ends with one line (or finds it up to date)."""
    src = write_source(tmp_path / "src", {"edit/train": [json.dumps(edit_row(i)).encode() for i in range(300)]})
    out = tmp_path / "data"
    procs = [subprocess.Popen([sys.executable, "-m", "data_prep", "--source", str(src), "--out", str(out), "--no-progress"],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _, _ in results) in ([0, 0], [0, 2]), results
    for rc, stdout, stderr in results:
        if rc == 2:
            assert stderr.count("\n") == 1 and "another process wrote it" in stderr, stderr
    assert build(str(src), out, progress=False)["up_to_date"]
    assert not list(tmp_path.glob(".data.tmp-*"))


def test_temp_dirs_of_killed_builds_are_removed(tmp_path):
    """kill -9 during a build leaves .OUT.tmp-HOST-PID-*; the next build removes those of dead PIDs."""
    src = write_source(tmp_path / "src", {"edit/train": [json.dumps(edit_row(i)).encode() for i in range(3000)]})
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, data_prep.build as b; "
                             "b.write_outputs = lambda *a, **k: (print('writing', flush=True), __import__('time').sleep(60)); "
                             "b.build(sys.argv[1], sys.argv[2], progress=False)", str(src), str(out)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    left = list(tmp_path.glob(".data.tmp-*"))
    assert len(left) == 1 and f"-{proc.pid}-" in left[0].name
    proc.kill()
    proc.wait()
    live = tmp_path / f".data.tmp-{os.uname().nodename}-{os.getpid()}-x"  # a live process's: kept
    live.mkdir()
    build(str(src), out, progress=False)
    assert not left[0].exists() and live.exists()
