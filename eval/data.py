"""What the eval reads from a prepared data dir (data_prep's output), and the held-out checks.

    prompts/SPLIT.jsonl   {"id", "prompt", "original_response", "reference_edit"[, "domain", "language"]}
                          one row per edit/SPLIT row: the generation metrics
    pairs/SPLIT.jsonl     {"id", "prompt", "chosen", "rejected", "kind"} from edit_quality/SPLIT:
                          the likelihood metrics (kind good_vs_bad or good_vs_original)
    sft/SPLIT.jsonl       where a prompts row lacks domain/language, they are read from the sft row
                          whose messages start with the same prompt
    manifest.json         its sha256 is compared with the model's training record; leakage counts printed
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from hs3.io import UserError, read_jsonl, sha256_file

TRAINING_RECORD = "hs3_training.json"


def _read_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None
    for n, row in enumerate(rows, 1):
        missing = [k for k in required if k not in row]
        if missing:
            raise UserError(f"{path} row {n}: missing {', '.join(missing)} (is this a data_prep output dir?)")
    return rows


def _prompt_key(messages: list[dict]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def load_edit_rows(data_dir: str | Path, split: str, max_rows: int = -1) -> list[dict]:
    """The rows to generate edits for, each with its domain and language."""
    data_dir = Path(data_dir)
    path = data_dir / "prompts" / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"data_dir={data_dir}: no prompts/{split}.jsonl (prepare the data first: ./launch.sh data ...)")
    rows = _read_rows(path, ("id", "prompt", "original_response", "reference_edit"))
    if max_rows >= 0:
        rows = rows[:max_rows]
    if not rows:
        raise UserError(f"{path}: no rows to evaluate")
    if any("domain" not in r or "language" not in r for r in rows):
        groups = {}
        sft_path = data_dir / "sft" / f"{split}.jsonl"
        if sft_path.is_file():
            for sft_row in read_jsonl(sft_path):
                groups.setdefault(_prompt_key(sft_row["messages"][:-1]),
                                  (sft_row.get("domain", "unknown"), sft_row.get("language", "unknown")))
        for row in rows:
            domain, language = groups.get(_prompt_key(row["prompt"]), ("unknown", "unknown"))
            row.setdefault("domain", domain)
            row.setdefault("language", language)
    return rows


def load_pairs(data_dir: str | Path, split: str, max_rows: int = -1) -> list[dict]:
    """edit_quality preference pairs (at most max_rows of each kind); [] when the file is absent."""
    path = Path(data_dir) / "pairs" / f"{split}.jsonl"
    if not path.is_file():
        return []
    pairs = _read_rows(path, ("id", "prompt", "chosen", "rejected", "kind"))
    if max_rows < 0:
        return pairs
    kept, per_kind = [], {}
    for pair in pairs:
        per_kind[pair["kind"]] = per_kind.get(pair["kind"], 0) + 1
        if per_kind[pair["kind"]] <= max_rows:
            kept.append(pair)
    return kept


def training_record(checkpoint: Optional[str]) -> Optional[dict]:
    """A checkpoint's hs3_training.json, or None (a base model, a hub id, an endpoint)."""
    if not checkpoint:
        return None
    path = Path(checkpoint) / TRAINING_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path}: not valid JSON") from None


def check_held_out(record: Optional[dict], checkpoint: str, splits: list[str], role: str = "model") -> None:
    """Refuse to score a model on a split it was trained on."""
    if not record:
        return
    seen = [s for s in splits if s in (record.get("trained_on") or [])]
    if seen:
        raise UserError(f"{role} {checkpoint} was trained on {', '.join(seen)} (its {TRAINING_RECORD} says so): "
                        f"scoring it there would not be held-out; evaluate another split (eval.split=...)")


def manifest_notes(data_dir: str | Path, records: list[tuple[str, Optional[dict]]]) -> list[str]:
    """Lines worth printing before an eval: data-build mismatches and the manifest's leakage counts."""
    notes = []
    manifest_path = Path(data_dir) / "manifest.json"
    if not manifest_path.is_file():
        return [f"note: {manifest_path} not found: held-out checks rely on the models' training records only"]
    digest = sha256_file(manifest_path)
    for name, record in records:
        recorded = (record or {}).get("data_manifest_sha256")
        if recorded and recorded != digest:
            notes.append(f"warning: {name} was trained on another data build (manifest sha256 {recorded[:12]} != "
                         f"{digest[:12]}): its training rows may overlap this eval's")
    try:
        leakage = json.loads(manifest_path.read_text(encoding="utf-8")).get("leakage")
    except ValueError:
        raise UserError(f"{manifest_path}: not valid JSON") from None
    counts = [f"{key}={value}" for key, value in _numbers(leakage) if value]
    if counts:
        action = leakage.get("action") if isinstance(leakage, dict) else None
        notes.append(f"leakage flagged by the data manifest: {', '.join(counts)}" + (f" ({action})" if action else ""))
    return notes


def _numbers(node, prefix: str = ""):
    """(dotted key, number) for every number in a nested dict: the leakage report, whatever its depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix, node
