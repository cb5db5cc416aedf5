"""Where HelpSteer3 rows come from: a local copy of the dataset repo, or the Hugging Face hub.

Both yield, per subset and split, `RawRow`s: the row number and either the parsed record or the
reason it could not be parsed. Local files are read line by line (not through a JSON loader) so
that a malformed line or invalid UTF-8 is one rejected row, not a failed run.
"""
from __future__ import annotations

import codecs
import gzip
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.schema import INVALID_UTF8, MALFORMED_JSON, SPLITS, SUBSETS

ALL_SUBSETS = SUBSETS + ("feedback", "preference")  # HelpSteer3's subsets the data step reads (--subsets)
from hs3.io import UserError, sha256_file

HUB_DATASET = "nvidia/HelpSteer3"
LAYOUT = "edit/{train,validation}.jsonl.gz and edit_quality/{train,validation}.jsonl.gz (or plain .jsonl)"
# JSON escapes of UTF-16 surrogates: json.loads accepts them, UTF-8 cannot encode a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


@dataclass
class RawRow:
    row: int
    record: Any = None  # the parsed JSON value, when it parsed
    reason: str | None = None  # why it did not parse
    detail: str = ""
    text: str = ""  # the raw line, kept for rejected.jsonl when it did not parse


# HelpSteer3 rows nest 4 deep (row > context > turn > content); much deeper is hostile, and recursion
# over it (json.dumps, the checks) would hit Python's recursion limit.
MAX_DEPTH = 32


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (strict JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} overflows a float (strict JSON output could not hold it)")
    return value


class DuplicateKey(ValueError):
    """An object with one key twice: json.loads would keep the last value silently."""


def _unique_keys(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKey(f"duplicate key {key!r} (JSON would keep only its last value)")
    return obj


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_line(row: int, raw: bytes) -> RawRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRow(row, reason=INVALID_UTF8, detail=f"byte {exc.start}: {exc.reason}",
                      text=raw.decode("utf-8", "backslashreplace"))
    try:
        record = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        return RawRow(row, reason=MALFORMED_JSON, detail=str(exc), text=text)
    except ValueError as exc:  # NaN, Infinity, 1e400, a key twice
        return RawRow(row, reason=MALFORMED_JSON, detail=str(exc), text=text)
    except RecursionError:
        return RawRow(row, reason=MALFORMED_JSON, detail=f"nested deeper than {MAX_DEPTH} levels", text=text)
    if _depth(record) > MAX_DEPTH:
        return RawRow(row, reason=MALFORMED_JSON, detail=f"nested deeper than {MAX_DEPTH} levels", text=text)
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            return RawRow(row, reason=INVALID_UTF8, detail=f"lone surrogate escape: {exc.reason}", text=text)
    return RawRow(row, record=record)


class DirSource:
    """A local copy laid out as the dataset repo (see LAYOUT). An empty file is a split with 0 rows."""

    def __init__(self, path: str, subsets: tuple[str, ...] = SUBSETS):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"--source {path}: no such directory (expected a local copy of {HUB_DATASET}: {LAYOUT})")
        if not self.path.is_dir():
            raise UserError(f"--source {path}: not a directory (expected {LAYOUT})")
        self.files = {(subset, split): self._find(subset, split) for subset in subsets for split in SPLITS}

    def _find(self, subset: str, split: str) -> Path:
        gz, plain = (self.path / subset / f"{split}.jsonl{ext}" for ext in (".gz", ""))
        if gz.is_file() and plain.is_file():
            raise UserError(f"--source {self.path}: both {gz} and {plain} exist; keep one")
        if gz.is_file() or plain.is_file():
            return gz if gz.is_file() else plain
        hint = ""
        if (self.path.parent / subset).is_dir() or self.path.name in ALL_SUBSETS:
            hint = f" (pass the directory above {self.path.name}/)"
        layout = LAYOUT if subset in SUBSETS else "SUBSET/{train,validation}.jsonl.gz (or .jsonl) for each of --subsets"
        raise UserError(f"--source {self.path}: {subset}/{split}.jsonl.gz (or .jsonl) not found; expected {layout}{hint}")

    def describe(self) -> dict:
        return {"type": "dir", "path": str(self.path),
                "files": {f"{subset}/{split}": {"file": str(path.relative_to(self.path)), "sha256": self._sha256(path)}
                          for (subset, split), path in self.files.items()}}

    @staticmethod
    def _sha256(path: Path) -> str:
        try:
            return sha256_file(path)
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None

    def read(self, subset: str, split: str) -> list[RawRow]:
        path = self.files[subset, split]
        try:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        if data.startswith(codecs.BOM_UTF8):  # a UTF-8 BOM (utf-8-sig) is not part of the first row
            data = data[len(codecs.BOM_UTF8):]
        head = data[:4096]
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or (head and head.count(0) * 4 >= len(head)):
            # UTF-16/32 (a BOM, or NUL bytes in every other byte): not a file of bad rows but one of another encoding
            raise UserError(f"cannot read {path}: it is UTF-16 or UTF-32 text (or binary), not UTF-8 JSON lines; "
                            "save it as UTF-8")
        # Rows are lines; blank lines (e.g. the final newline) are not rows. A file that ends its lines
        # with CR alone (old Mac) is split on CR (a JSON text holds no raw CR inside a string).
        newline = b"\r" if b"\n" not in data and b"\r" in data else b"\n"
        return [parse_line(i, line) for i, line in enumerate(data.split(newline)) if line.strip()]


class HubSource:
    """nvidia/HelpSteer3 through datasets.load_dataset, at a pinned revision."""

    def __init__(self, revision: str, subsets: tuple[str, ...] = SUBSETS):
        self.revision = revision
        self.datasets = {subset: self._load(subset) for subset in subsets}

    def _load(self, subset: str):
        import datasets

        try:
            loaded = datasets.load_dataset(HUB_DATASET, subset, revision=self.revision)
        except Exception as exc:  # offline, unreachable, unknown revision: all the same advice
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(
                f"cannot load {HUB_DATASET} ({subset}, revision {self.revision}) from the Hugging Face hub: "
                f"{first_line[:200]}. Without hub access, copy the dataset's files and pass --source DIR ({LAYOUT})"
            ) from None
        missing = [s for s in SPLITS if s not in loaded]
        if missing:
            raise UserError(f"{HUB_DATASET} ({subset}, revision {self.revision}) has no split {', '.join(missing)}")
        return loaded

    def describe(self) -> dict:
        return {"type": "hf", "dataset": HUB_DATASET, "revision": self.revision,
                "fingerprints": {f"{subset}/{split}": self.datasets[subset][split]._fingerprint
                                 for subset in self.datasets for split in SPLITS}}

    def read(self, subset: str, split: str) -> list[RawRow]:
        return [RawRow(i, record=record) for i, record in enumerate(self.datasets[subset][split])]


def open_source(source: str, revision: str, subsets: tuple[str, ...] = SUBSETS) -> DirSource | HubSource:
    return HubSource(revision, subsets) if source == "hf" else DirSource(source, subsets)
