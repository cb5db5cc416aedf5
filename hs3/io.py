"""Small I/O helpers every package uses: user errors, atomic and deterministic writes."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


class UserError(Exception):
    """Bad input or config: the CLI prints `error: <message>` on one line and exits 2."""


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI entry point: user errors become one line and exit 2, Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def dumps_json(obj: Any) -> str:
    """The one JSON encoding used for every output line: stable key order, real UTF-8."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=False, separators=(", ", ": "))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temp file beside `path` to write; renamed onto `path` when the block succeeds, removed when it
    fails: readers never see half a file. `suffix` keeps an extension for writers that go by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the mode of any new file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that PID is running (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file, or a dir and everything under it, the mode a new file gets under the umask
    (0o666, dirs 0o777, less the umask). For outputs that a library writes owner-only (safetensors
    writes 0600, tempfile.mkdtemp makes 0700). Only what this process's user owns is changed: in a run
    dir shared by a group (umask 002), another member's files keep their modes (chmod on them is not
    allowed, and they are theirs to set)."""
    mask = _umask()
    me = os.geteuid()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or st.st_uid != me:
            continue
        mode = (0o777 if stat.S_ISDIR(st.st_mode) else 0o666) & ~mask
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(p, mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    lines = [dumps_json(r) + "\n" for r in rows]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def truncated(path: str | os.PathLike) -> str | None:
    """Why a checkpoint file is incomplete (a node crash before fsync, a full disk), or None when it looks
    whole. Cheap: a safetensors file must be as long as its header says (8-byte header length, the JSON
    header, then the tensors up to the largest data offset); a torch.save / .bin / .pth file (a zip
    archive) must end with the zip's central directory. Other files: None."""
    import struct
    import zipfile

    path = Path(path)
    try:
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return f"{path.name} is truncated ({size} bytes)"
                (length,) = struct.unpack("<Q", head)
                if 8 + length > size:
                    return f"{path.name} is truncated (its header alone is {length} bytes; the file has {size})"
                header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if size != 8 + length + end:
                return f"{path.name} is truncated ({size} bytes; its header says {8 + length + end})"
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or not a torch.save archive"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{path.name} cannot be read ({type(exc).__name__})"
    return None
