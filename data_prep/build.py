"""HelpSteer3 -> sft/, pairs/, prompts/, rejected.jsonl and manifest.json under OUT.

    read every row -> check its schema -> find held-out leaks -> emit conversations, pairs, prompts
    -> count tokens (optional) -> write everything into a temp dir beside OUT -> rename it to OUT

Every row read is either used (it emitted at least one output line) or rejected with a reason, and
the manifest's counts say so (read = used + rejected). Same inputs and options give the same bytes.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_prep import build_edit_conversation, is_copy
from data_prep.feedback import selected_indices
from data_prep.schema import (EQUAL_PAIRS, LEAKED, SPLITS, SUBSETS, TOO_LONG, check_row, extra_fields)
from data_prep.sources import ALL_SUBSETS, open_source
from data_prep import feedback_data, select_data
from hs3.io import UserError, dumps_json, follow_umask

FORMAT_VERSION = 2  # 2: validation rows over --max-seq-len are kept and flagged (1 rejected them)
OUTPUT_KINDS = ("sft", "pairs", "prompts")
PAIR_KINDS = ("good_vs_bad", "good_vs_original")
LEAK_RULE = ("a train row (edit or edit_quality) whose context and original_response equal those of "
             "a validation row (edit or edit_quality)")
# With the feedback or preference subset: a row's (context, response) pairs are its original_response
# (edit, edit_quality) or each of response1/response2 (feedback, preference).
LEAK_RULE_ALL = ("a train row of any subset with a (context, response) equal to a (context, response) of a "
                 "validation row of any subset (response: original_response, or response1 and response2)")
# What each subset emits (--subsets); kinds in file order.
SUBSET_OUTPUTS = {"edit": ("sft", "prompts"), "edit_quality": ("pairs",), "feedback": ("feedback",),
                  "preference": ("select",)}
DEFAULT_SUBSETS = SUBSETS


def output_kinds(subsets) -> tuple[str, ...]:
    """The output kinds of the selected subsets, in a fixed order (sft, pairs, prompts, feedback, select)."""
    wanted = {kind for subset in subsets for kind in SUBSET_OUTPUTS[subset]}
    return tuple(kind for kind in OUTPUT_KINDS + ("feedback", "select") if kind in wanted)


def parse_subsets(value) -> tuple[str, ...]:
    """'edit,feedback' (or a list) -> the subsets in HelpSteer3's order; unknown names are a UserError."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if str(n).strip()]
    unknown = [n for n in names if n not in ALL_SUBSETS]
    if unknown or not names:
        raise UserError(f"--subsets {value}: expected a comma-separated list of {', '.join(ALL_SUBSETS)}")
    return tuple(n for n in ALL_SUBSETS if n in names)
TOKEN_BATCH_ROWS = 64


@dataclass
class Options:
    feedback_orders: str = "all"  # all | given | K (an integer: K distinct permutations chosen with seed)
    seed: int = 1234
    tokenizer: str | None = None  # name or path; counts tokens of every conversation
    max_seq_len: int | None = None  # reject train rows with a longer sequence; flag validation rows (needs tokenizer)
    strict: bool = False  # any rejected row fails the run
    keep_leaked: bool = False  # keep train rows that leak a validation row
    subsets: Any = DEFAULT_SUBSETS  # HelpSteer3 subsets to read (a tuple, or "edit,feedback,...")
    feedback_targets: str = "one"  # feedback subset: one (seeded) | all feedback texts per response
    feedback_instruction: str | None = None  # feedback subset: None = data_prep.feedback_prompt.FEEDBACK_INSTRUCTION
    # edit, edit_quality: rows with <= 3 feedback items keep those that start "The response is perfectly"
    # (the earlier policy; default: dropped for every length, as the paper's Edit demonstrations)
    keep_perfect_feedback: bool = False

    def validate(self) -> None:
        parse_feedback_orders(self.feedback_orders)
        self.subsets = parse_subsets(self.subsets)
        if self.feedback_targets not in feedback_data.FEEDBACK_TARGETS:
            raise UserError(f"--feedback-targets {self.feedback_targets}: expected one or all")
        if self.max_seq_len is not None:
            if self.max_seq_len < 1:
                raise UserError(f"--max-seq-len {self.max_seq_len}: must be >= 1")
            if not self.tokenizer:
                raise UserError("--max-seq-len needs --tokenizer NAME_OR_PATH to count tokens with")

    def recorded(self) -> dict:
        """The options as the manifest records them (the seed only where it chooses something)."""
        options = asdict(self)
        subsets = parse_subsets(self.subsets)
        if not isinstance(parse_feedback_orders(self.feedback_orders), int) and "feedback" not in subsets:
            options["seed"] = None
        options["feedback_orders"] = str(self.feedback_orders)
        # The default build's options read as before these keys existed (its manifest stays the same).
        del options["subsets"], options["feedback_targets"], options["feedback_instruction"]
        if subsets != DEFAULT_SUBSETS:
            options["subsets"] = list(subsets)
        if "feedback" in subsets:
            from data_prep.feedback_prompt import FEEDBACK_INSTRUCTION

            options["feedback_targets"] = self.feedback_targets
            options["feedback_instruction"] = self.feedback_instruction or FEEDBACK_INSTRUCTION
        return options


def parse_feedback_orders(value: str | int) -> str | int:
    text = str(value).strip()
    if text in ("all", "given"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise UserError(f"--feedback-orders {value}: expected all, given, or a number of permutations >= 1")


def feedback_permutations(n_items: int, orders: str | int, seed: int, row_key: str) -> list[tuple[int, ...]]:
    """Orders of a row's (selected) feedback items, as tuples of positions; lexicographic order.

    `all`: every permutation (the first is the given order). `given`: the given order only.
    K: K distinct permutations drawn with a generator seeded by (seed, row), so a row's draw
    does not depend on which other rows exist; all of them when K >= n_items!.
    """
    every = list(itertools.permutations(range(n_items)))
    if orders == "all":
        return every
    if orders == "given":
        return [tuple(range(n_items))]
    if orders >= len(every):
        return every
    return sorted(random.Random(f"{seed}:{row_key}").sample(every, orders))


@dataclass
class Row:
    """One input row on its way through the build."""

    subset: str
    split: str
    row: int
    record: Any = None
    raw_text: str = ""
    reason: str | None = None
    detail: str = ""
    leak_matches: list[str] = field(default_factory=list)
    outputs: dict[str, list[dict]] = field(default_factory=dict)  # kind -> output lines
    lengths: dict[str, list[int]] = field(default_factory=dict)  # kind -> token count per output line
    equal_pairs: list[str] = field(default_factory=list)  # pair kinds not emitted (equal sides)

    @property
    def key(self) -> str:
        return f"{self.subset}/{self.split}/{self.row}"

    def reject(self, reason: str, detail: str) -> None:
        self.reason, self.detail, self.outputs, self.lengths = reason, detail, {}, {}


def leak_key(record: dict) -> str:
    return json.dumps([[t["role"], t["content"]] for t in record["context"]] + [record["original_response"]],
                      ensure_ascii=False)


def leak_keys(subset: str, record: dict) -> list[str]:
    """A row's (context, response) keys: original_response (edit, edit_quality), response1 and response2."""
    return feedback_data.leak_keys(record) if subset in ("feedback", "preference") else [leak_key(record)]


def check_any_row(subset: str, record) -> tuple[str, str] | None:
    if subset == "feedback":
        return feedback_data.check_feedback_row(record)
    if subset == "preference":
        return select_data.check_preference_row(record)
    return check_row(subset, record)


def emit(row: Row, orders, options: Options) -> None:
    """The row's output lines, by subset."""
    if row.subset == "edit":
        emit_edit(row, orders, options.seed, options.keep_perfect_feedback)
    elif row.subset == "edit_quality":
        emit_edit_quality(row, options.keep_perfect_feedback)
    elif row.subset == "feedback":
        feedback_data.emit_feedback(row, options.feedback_targets, options.seed, options.feedback_instruction,
                                    feedback_data.extra_fields(row.record))
    else:
        select_data.emit_select(row, select_data.extra_fields(row.record))


def metadata(subset: str, record: dict) -> dict:
    """change_summary (edit rows that have one) and any field HelpSteer3's schema does not name."""
    extra = extra_fields(subset, record)
    if subset == "edit" and record.get("change_summary") is not None:
        extra = {"change_summary": record["change_summary"], **extra}
    return extra


def emit_edit(row: Row, orders: str | int, seed: int, keep_perfect: bool = False) -> None:
    """SFT conversations (one per feedback order) and one RL prompt (the given order)."""
    record = row.record
    selected = selected_indices(record["feedback"], keep_perfect=keep_perfect)
    common = {"domain": record["domain"], "language": record["language"]}
    extra = metadata("edit", record)
    sft = []
    for perm in feedback_permutations(len(selected), orders, seed, row.key):
        order = [selected[i] for i in perm]  # positions in the row's own feedback list
        messages = build_edit_conversation(record["context"], record["original_response"],
                                           [record["feedback"][i] for i in order], keep_perfect)
        messages.append({"role": "assistant", "content": record["edited_response"]})
        tag = "-".join(map(str, order)) or "none"
        sft.append({"id": f"{row.key}/{tag}", "messages": messages, **common,
                    "source": {"subset": row.subset, "split": row.split, "row": row.row, "feedback_order": order},
                    **({"metadata": extra} if extra else {})})
    prompt = build_edit_conversation(record["context"], record["original_response"],
                                     [record["feedback"][i] for i in selected], keep_perfect)
    prompts = [{"id": row.key, "prompt": prompt, "original_response": record["original_response"],
                "reference_edit": record["edited_response"], **common,
                "source": {"subset": row.subset, "split": row.split, "row": row.row, "feedback_order": selected},
                **({"metadata": extra} if extra else {})}]
    row.outputs = {"sft": sft, "prompts": prompts}


def emit_edit_quality(row: Row, keep_perfect: bool = False) -> None:
    """Two preference pairs: good edit over bad edit, good edit over the unedited original."""
    record = row.record
    selected = selected_indices(record["feedback"], keep_perfect=keep_perfect)
    prompt = build_edit_conversation(record["context"], record["original_response"],
                                     [record["feedback"][i] for i in selected], keep_perfect)
    good = record["good_edited_response"]
    extra = metadata("edit_quality", record)
    pairs = []
    for kind, other in zip(PAIR_KINDS, (record["bad_edited_response"], record["original_response"])):
        if is_copy(good, other):
            row.equal_pairs.append(kind)
            continue
        pairs.append({"id": f"{row.key}/{kind}", "prompt": prompt,
                      "chosen": [{"role": "assistant", "content": good}],
                      "rejected": [{"role": "assistant", "content": other}], "kind": kind,
                      "domain": record["domain"], "language": record["language"],
                      "source": {"subset": row.subset, "split": row.split, "row": row.row, "feedback_order": selected},
                      **({"metadata": extra} if extra else {})})
    if pairs:
        row.outputs = {"pairs": pairs}
    else:
        row.reject(EQUAL_PAIRS, "good_edited_response equals both bad_edited_response and original_response "
                                "after whitespace normalisation")


def _conversations(batch: list[Row]) -> tuple[list, list, list, list]:
    """What to count for a batch of rows: pair sides (whole conversations), RL prompts (with the
    generation prompt), SFT conversations as variants of one conversation (they differ only in the
    edit request), and the output line each count belongs to, in that order."""
    full, prompts, variants = [], [], []
    full_owners, prompt_owners, variant_owners = [], [], []
    for r_index, r in enumerate(batch):
        for kind, lines in r.outputs.items():
            if kind == "sft":
                variants.append((lines[0]["messages"], len(lines[0]["messages"]) - 2,
                                 [line["messages"][-2]["content"] for line in lines]))
                variant_owners += [(r_index, kind, i) for i in range(len(lines))]
            elif kind in ("pairs", "select"):
                for i, line in enumerate(lines):
                    full += [line["prompt"] + line["chosen"], line["prompt"] + line["rejected"]]
                    full_owners += [(r_index, kind, i)] * 2
            elif kind == "feedback":
                full += [line["messages"] for line in lines]
                full_owners += [(r_index, kind, i) for i in range(len(lines))]
            else:
                prompts += [line["prompt"] for line in lines]
                prompt_owners += [(r_index, kind, i) for i in range(len(lines))]
    return full, prompts, variants, full_owners + prompt_owners + variant_owners


_WORKER_COUNTER = None  # the parent's TokenCounter, inherited by forked workers


def _count_in_worker(job: tuple[list, list, list]) -> list[int]:
    return _flat(_WORKER_COUNTER.count_batch(*job))


def _flat(counts: tuple[list, list, list]) -> list[int]:
    full, prompts, variants = counts
    return full + prompts + [n for group in variants for n in group]


def count_tokens(rows: list[Row], counter, max_seq_len: int | None, progress: bool, workers: int = 1) -> None:
    """Token counts of every output line (SFT: the whole conversation; pair: prompt + the longer
    side; prompt: with the generation prompt); train rows with a sequence over max_seq_len are
    rejected (too_long), validation rows are kept and their longer lines flagged (over_max_seq_len).
    With workers > 1 the batches are counted in forked processes (same counts, same order)."""
    global _WORKER_COUNTER
    import multiprocessing

    from tqdm import tqdm

    used = [r for r in rows if r.outputs]
    batches = [used[i:i + TOKEN_BATCH_ROWS] for i in range(0, len(used), TOKEN_BATCH_ROWS)]
    owners = []

    def jobs():
        for batch in batches:
            full, prompts, variants, batch_owners = _conversations(batch)
            owners.append(batch_owners)
            yield full, prompts, variants

    pool = None
    job_iter = jobs()
    results = []
    if batches:  # the first batch here: it also checks the shortcut against apply_chat_template
        results = [_flat(counter.count_batch(*next(job_iter)))]
    saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
    if workers > 1 and len(batches) > 2 and "fork" in multiprocessing.get_all_start_methods():
        _WORKER_COUNTER = counter
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker encodes on one core
        pool = multiprocessing.get_context("fork").Pool(workers)
        later = pool.imap(_count_in_worker, job_iter)
    else:
        later = (_flat(counter.count_batch(*job)) for job in job_iter)
    try:
        with tqdm(total=len(used), desc="count tokens", unit="row", disable=None if progress else True) as bar:
            for batch_index, (batch, lengths) in enumerate(zip(batches, itertools.chain(results, later))):
                counts: dict[tuple[int, str, int], int] = {}
                for owner, n in zip(owners[batch_index], lengths, strict=True):
                    counts[owner] = max(n, counts.get(owner, 0))
                for r_index, r in enumerate(batch):
                    r.lengths = {kind: [counts[r_index, kind, i] for i in range(len(lines))]
                                 for kind, lines in r.outputs.items()}
                    longest = max(max(v) for v in r.lengths.values())
                    if max_seq_len is not None and longest > max_seq_len:
                        if r.split == "validation":  # held out: never dropped for a training limit
                            flag_over_max_seq_len(r, max_seq_len)
                        else:
                            r.reject(TOO_LONG, f"{longest} tokens > --max-seq-len {max_seq_len}")
                bar.update(len(batch))
    finally:
        if pool is not None:
            pool.terminate()
            _WORKER_COUNTER = None
            if saved_env is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved_env


def perfect_feedback_counts(used: list[Row], keep_perfect: bool) -> dict:
    """Used rows (edit, edit_quality) by what the perfectly-helpful rule did to them: `rows_dropped`
    lost such items (3 or fewer items; with more, the seed's selection skips them either way),
    `rows_left_without_feedback` had only such items and ask with <None>; with --keep-perfect-feedback,
    `rows_kept` still carry such items in their edit request."""
    from data_prep.feedback import is_perfect

    short = [r for r in used if 0 < len(r.record["feedback"]) <= 3 and any(map(is_perfect, r.record["feedback"]))]
    if keep_perfect:
        return {"policy": "kept (--keep-perfect-feedback)", "rows_kept": len(short)}
    return {"policy": "dropped", "rows_dropped": len(short),
            "rows_left_without_feedback": sum(all(map(is_perfect, r.record["feedback"])) for r in short)}


def flag_over_max_seq_len(row: Row, max_seq_len: int) -> None:
    """A validation row's output lines longer than max_seq_len get "over_max_seq_len": true (kept; the
    manifest counts them per split; the eval shortens them by its documented rule)."""
    for kind, lines in row.outputs.items():
        for line, n in zip(lines, row.lengths[kind]):
            if n > max_seq_len:
                line["over_max_seq_len"] = True


def over_max_seq_len_counts(used: list[Row]) -> dict:
    """Validation rows (and their lines, per output kind) flagged over --max-seq-len."""
    lines = Counter(kind for r in used for kind, out in r.outputs.items() for line in out if line.get("over_max_seq_len"))
    rows = sum(1 for r in used if any(line.get("over_max_seq_len") for out in r.outputs.values() for line in out))
    return {"rows": rows, "lines": dict(sorted(lines.items()))}


def percentiles(values: list[int]) -> dict:
    """Nearest-rank percentiles (integers, so the manifest stays byte-stable)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def rank(p: float) -> int:
        return ordered[max(0, -(-len(ordered) * p // 100) - 1)]

    return {"count": len(ordered), "min": ordered[0], "p50": rank(50), "p90": rank(90), "p95": rank(95),
            "p99": rank(99), "max": ordered[-1]}


class _Writer:
    """A JSONL file written once, hashing as it goes. Hashing and writing happen on a background
    thread (both release the GIL), overlapping with the JSON encoding of the next lines."""

    BUFFER_BYTES = 1 << 22

    def __init__(self, path: Path, thread: ThreadPoolExecutor):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.lines = 0
        self.bytes = 0
        self.thread = thread
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.pending = []

    def write(self, obj: Any) -> None:
        self.write_json(dumps_json(obj))

    def write_json(self, text: str) -> None:
        data = (text + "\n").encode("utf-8")
        self.buffer.append(data)
        self.buffered += len(data)
        self.lines += 1
        if self.buffered >= self.BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.pending.append(self.thread.submit(self._store, b"".join(self.buffer)))
            self.buffer, self.buffered = [], 0

    def _store(self, data: bytes) -> None:
        self.sha.update(data)
        self.bytes += len(data)
        self.file.write(data)

    def close(self) -> dict:
        self._flush()
        for future in self.pending:
            future.result()  # re-raises a failed write
        self.file.close()
        return {"lines": self.lines, "bytes": self.bytes, "sha256": self.sha.hexdigest()}


_PLACEHOLDER = "\x00messages\x00"


def sft_lines_json(lines: list[dict]) -> list[str]:
    """dumps_json of each of a row's SFT lines (the same bytes), encoding once the messages they
    share (all but the edit request): the feedback orders of a row repeat its longest texts."""
    first = lines[0]["messages"]
    shared, last = ", ".join(dumps_json(m) for m in first[:-2]), dumps_json(first[-1])
    out = []
    for line in lines:
        messages = line["messages"]
        if messages[:-2] != first[:-2] or messages[-1] != first[-1]:
            out.append(dumps_json(line))
            continue
        encoded = "[" + ", ".join(filter(None, (shared, dumps_json(messages[-2]), last))) + "]"
        # "id" comes first and holds no NUL, so the first placeholder is the messages value.
        out.append(dumps_json({**line, "messages": _PLACEHOLDER}).replace(dumps_json(_PLACEHOLDER), encoded, 1))
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("helpsteer3-edit", "datasets", "transformers", "tokenizers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def tokenizer_info(name: str, tokenizer) -> dict:
    return {"name": name, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest()}


def fingerprint(manifest: dict) -> dict:
    """What makes two builds the same: the input contents, the options, the tokenizer (not paths)."""
    source = {k: v for k, v in manifest["source"].items() if k != "path"}
    return {"format_version": manifest.get("format_version"), "source": source,
            "options": manifest.get("options"), "tokenizer": manifest.get("tokenizer")}


def existing_build(out: Path) -> dict | None:
    """The manifest of a build already in OUT; None when OUT is absent or empty. Files the pipeline
    adds beside a build (config.yaml, summary.json) belong to it."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"output dir {out}: exists and is not a directory")
    if not any(out.iterdir()):
        return None
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("tool") != "data_prep" or not isinstance(manifest.get("source"), dict):
            raise ValueError
    except (OSError, ValueError, RecursionError):
        raise UserError(f"output dir {out}: not empty and holds no data_prep build (manifest.json); "
                        f"pass a new or empty directory") from None
    return manifest


def damaged_outputs(out: Path, manifest: dict, verify: bool = False) -> list[str]:
    """The output files of the build in OUT that do not match its manifest: missing, another size, or
    (verify, or a manifest that records no size) another sha256. Sizes cost a stat per file; hashes
    read every byte (~1 GB at full scale, a second or two)."""
    from hs3.io import sha256_file

    damaged = []
    for name, entry in manifest.get("outputs", {}).items():
        path = out / name
        if not path.is_file():
            damaged.append(f"{name} missing")
        elif "bytes" in entry and path.stat().st_size != entry["bytes"]:
            damaged.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif (verify or "bytes" not in entry) and sha256_file(path) != entry.get("sha256"):
            damaged.append(f"{name} has another sha256 than the manifest's")
    return damaged


TMP_MARK = ".tmp-"


def estimated_output_bytes(all_rows: list[Row], samples: int = 500) -> int:
    """The build's output size, extrapolated from the JSON of an even sample of its rows (a few ms)."""
    if not all_rows:
        return 0
    sample = all_rows[::max(1, len(all_rows) // samples)]
    size = 0
    for row in sample:
        for lines in row.outputs.values():
            size += sum(len(dumps_json(line).encode("utf-8")) + 1 for line in lines)
        if row.reason is not None:
            size += len(dumps_json(row.record if row.record is not None else row.raw_text).encode("utf-8")) + 200
    return size * len(all_rows) // len(sample)


def temp_dir_for(out: Path) -> Path:
    """A new temp dir beside OUT, named .OUT.tmp-HOST-PID-XXXX so that a later build can tell whose it is."""
    prefix = f".{out.name}{TMP_MARK}{platform.node()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove the temp dirs that builds into OUT killed on this host (kill -9, power loss) left behind:
    those whose PID is no longer running. Another host's, or a live process's, are left alone."""
    from hs3.io import pid_alive

    removed = []
    host = platform.node()
    for path in out.parent.glob(f".{out.name}{TMP_MARK}{host}-*"):
        pid = path.name[len(f".{out.name}{TMP_MARK}{host}-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in sorted(out.parent.glob(f".{out.name}{TMP_MARK}*")):  # whether another host's build still runs is unknowable here
        if path.is_dir() and not path.name.startswith(f".{out.name}{TMP_MARK}{host}-"):
            print(f"data: left alone: {path} is the temp dir of a build on another host (delete it if no build runs "
                  "there)", file=sys.stderr)
    return removed


def write_outputs(tmp: Path, all_rows: list[Row], manifest: dict, progress: bool) -> None:
    """Every output file into tmp, then manifest.json (with each file's line count and sha256)."""
    from tqdm import tqdm

    writers: dict[str, _Writer] = {}
    rejected_writer = None
    try:
        with ThreadPoolExecutor(max_workers=1) as thread:  # one thread, so each file's chunks stay in order
            kinds = output_kinds(manifest["options"].get("subsets", DEFAULT_SUBSETS))
            writers = {f"{kind}/{split}.jsonl": _Writer(tmp / kind / f"{split}.jsonl", thread)
                       for kind in kinds for split in SPLITS}
            rejected_writer = _Writer(tmp / "rejected.jsonl", thread)
            for row in tqdm(all_rows, desc="write", unit="row", disable=None if progress else True):
                for kind, lines in row.outputs.items():
                    writer = writers[f"{kind}/{row.split}.jsonl"]
                    for text in sft_lines_json(lines) if kind == "sft" else map(dumps_json, lines):
                        writer.write_json(text)
                if row.reason is not None:
                    rejected_writer.write({"subset": row.subset, "split": row.split, "row": row.row, "reason": row.reason,
                                           "detail": row.detail,
                                           "record": row.record if row.record is not None else row.raw_text})
            manifest["outputs"] = {name: writer.close() for name, writer in writers.items()}
            manifest["outputs"]["rejected.jsonl"] = rejected_writer.close()
    finally:  # after a failed write (a full disk) no file stays open (it would hold the space and the mount)
        for writer in [*writers.values(), rejected_writer]:
            if writer is not None:
                with contextlib.suppress(OSError):
                    writer.file.close()
    manifest["versions"] = versions()
    with open(tmp / "manifest.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")


@contextlib.contextmanager
def _without_gc():
    """The build holds millions of small objects and makes no reference cycles: the cyclic
    collector would rescan them again and again for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build(source: str, out: str | os.PathLike, revision: str = "main", options: Options | None = None,
          progress: bool = True, tokenizer=None, workers: int | None = None,
          timings: dict | None = None, verify: bool = False) -> dict:
    """Build OUT from SOURCE ('hf' or a directory); returns the manifest (with "up_to_date": True
    and nothing rewritten when OUT already holds the very same build). `tokenizer` may be passed
    as an object (then options.tokenizer is only its recorded name). Token counting runs in
    `workers` processes (default: one per CPU); the output does not depend on it. `timings`, if
    given, receives the seconds each phase took (not part of the manifest: it must stay byte-stable).
    An OUT that holds this build is up to date only when its files match the manifest (sizes; sha256
    too with `verify`); otherwise it is refused (damaged_outputs)."""
    with _without_gc():
        return _build(source, out, revision, options or Options(), progress, tokenizer, workers,
                      {} if timings is None else timings, verify)


def _build(source, out, revision, options, progress, tokenizer, workers, timings, verify=False) -> dict:
    """build(), phase by phase: read and check, leaks, emit, count tokens, write, rename."""
    from tqdm import tqdm

    options.validate()
    orders = parse_feedback_orders(options.feedback_orders)
    out = Path(out)
    if out.is_symlink():  # build where it points (the temp dir beside the target, renamed onto it): the link stays
        out = Path(os.path.realpath(out))
    previous = existing_build(out)

    counter = None
    if options.tokenizer or tokenizer is not None:
        from data_prep.tokens import TokenCounter, load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(options.tokenizer)
        counter = TokenCounter(tokenizer)
    subsets = options.subsets
    src = open_source(source, revision, subsets)
    manifest: dict[str, Any] = {
        "tool": "data_prep", "format_version": FORMAT_VERSION, "source": src.describe(),
        "options": options.recorded(),
        "tokenizer": tokenizer_info(options.tokenizer or tokenizer.name_or_path, tokenizer) if counter else None,
    }
    if previous is not None:
        if fingerprint(previous) == fingerprint(manifest):
            if damaged := damaged_outputs(out, previous, verify):
                raise UserError(f"output dir {out}: holds this build, but its files do not match its manifest "
                                f"({'; '.join(damaged[:3])}{'; ...' if len(damaged) > 3 else ''}); delete {out} and rerun")
            return {**previous, "up_to_date": True}
        differ = [k for k, v in fingerprint(manifest).items() if fingerprint(previous).get(k) != v]
        raise UserError(f"output dir {out}: already holds a different data_prep build ({', '.join(differ)} differ); "
                        f"use another output dir (--out, or data_dir in the pipeline) or delete it")

    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    # Read and check every row.
    rows: dict[tuple[str, str], list[Row]] = {}
    for subset in subsets:
        for split in SPLITS:
            rows[subset, split] = []
            for raw in tqdm(src.read(subset, split), desc=f"read {subset}/{split}", unit="row", disable=None if progress else True):
                row = Row(subset, split, raw.row, raw.record, raw.text, raw.reason, raw.detail)
                if row.reason is None:
                    problem = check_any_row(subset, row.record)
                    if problem:
                        row.reason, row.detail = problem
                rows[subset, split].append(row)

    phase("read")
    # Held-out hygiene: train rows that repeat a validation row's (context, original_response).
    held_out: dict[str, list[str]] = {}
    # Ties and equal pairs still hold (context, response) pairs that are held out: they count too.
    for subset in subsets:
        for row in rows[subset, "validation"]:
            if row.reason is None or row.reason in (select_data.TIE, EQUAL_PAIRS):
                for key in dict.fromkeys(leak_keys(subset, row.record)):
                    held_out.setdefault(key, []).append(row.key)
    leaks = []
    for subset in subsets:
        for row in rows[subset, "train"]:
            if row.reason is None and (matches := [m for key in leak_keys(subset, row.record)
                                                   for m in held_out.get(key, [])]):
                matches = list(dict.fromkeys(matches))
                row.leak_matches = matches
                leaks.append({"row": row.key, "matches": matches})
                if not options.keep_leaked:
                    what = "original_response" if subset in SUBSETS else "response"
                    row.reject(LEAKED, f"same context and {what} as {', '.join(matches)}")

    all_rows = [row for subset in subsets for split in SPLITS for row in rows[subset, split]]
    for row in all_rows:
        if row.reason is None:
            emit(row, orders, options)
    phase("emit")
    if counter is not None:
        count_tokens(all_rows, counter, options.max_seq_len, progress, workers or os.cpu_count() or 1)

    phase("count_tokens")
    rejected = [row for row in all_rows if row.reason is not None]
    if options.strict and rejected:
        by_reason = Counter(row.reason for row in rejected)
        first = "; ".join(f"{r.key}: {r.reason} ({r.detail[:80]})" for r in rejected[:3])
        raise UserError(f"--strict: {len(rejected)} of {len(all_rows)} rows rejected "
                        f"({', '.join(f'{k} {v}' for k, v in sorted(by_reason.items()))}), first: {first}")

    manifest["counts"] = {}
    token_lengths: dict[str, list[int]] = {}
    for (subset, split), split_rows in rows.items():
        used = [r for r in split_rows if r.reason is None]
        by_reason = Counter(r.reason for r in split_rows if r.reason is not None)
        emitted = Counter()
        for r in used:
            for kind, lines in r.outputs.items():
                emitted[kind] += len(lines)
                if kind == "pairs":
                    emitted.update(line["kind"] for line in lines)
                if kind == "select":
                    emitted.update(f"weight_{line['weight']}" for line in lines)
                token_lengths.setdefault(f"{kind}/{split}", []).extend(r.lengths.get(kind, []))
        counts = {"read": len(split_rows), "used": len(used), "rejected": sum(by_reason.values()),
                  "rejected_by_reason": dict(sorted(by_reason.items())), "emitted": dict(sorted(emitted.items()))}
        if subset == "edit_quality":
            not_emitted = Counter(kind for r in used for kind in r.equal_pairs)
            counts["pairs_not_emitted"] = {"equal_after_whitespace_normalisation": dict(sorted(not_emitted.items()))}
        if subset == "edit":
            counts["feedback_items"] = dict(sorted(Counter(
                str(len(r.record["feedback"])) for r in split_rows if r.reason is None or r.reason == LEAKED).items()))
        if subset in SUBSETS:
            counts["perfect_feedback"] = perfect_feedback_counts(used, options.keep_perfect_feedback)
        if split == "validation" and options.max_seq_len is not None:
            counts["over_max_seq_len"] = over_max_seq_len_counts(used)
        assert counts["read"] == counts["used"] + counts["rejected"], (subset, split, counts)
        manifest["counts"][f"{subset}/{split}"] = counts
    manifest["leakage"] = {
        "rule": LEAK_RULE if subsets == DEFAULT_SUBSETS else LEAK_RULE_ALL,
        "action": "kept (--keep-leaked)" if options.keep_leaked else "removed from training",
        "leaked_rows": {f"{subset}/train": sum(1 for leak in leaks if leak["row"].startswith(f"{subset}/"))
                        for subset in subsets},
        "rows": leaks,
    }
    if counter is not None:
        manifest["token_lengths"] = {
            "counted_as": "apply_chat_template tokens: sft = whole conversation; pairs = prompt + the longer side; "
                          "prompts = prompt + generation prompt"
                          + ("" if subsets == DEFAULT_SUBSETS else
                             "; feedback = whole conversation; select = prompt + the longer side"),
            "max_seq_len": options.max_seq_len,
            **{name: percentiles(token_lengths.get(name, [])) for name in
               (f"{kind}/{split}" for kind in output_kinds(subsets) for split in SPLITS)},
        }

    # Write everything into a temp dir beside OUT; rename it to OUT at the very end.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out)
        needed, free = estimated_output_bytes(all_rows), shutil.disk_usage(out.parent).free
        if needed > free:  # checked up front: a full disk would otherwise fail the build at its very end
            raise UserError(f"output dir {out}: the build needs about {needed / 1e6:.1f} MB and {out.parent} has "
                            f"{free / 1e6:.1f} MB free")
        tmp = temp_dir_for(out)
    except OSError as exc:
        raise UserError(f"output dir {out}: cannot create it: {exc.strerror or exc}") from None
    follow_umask(tmp)  # mkdtemp makes 0700; OUT gets the mode of any new dir
    try:
        write_outputs(tmp, all_rows, manifest, progress)
        try:
            if out.exists():
                out.rmdir()  # an empty directory (existing_build allowed nothing else here)
            os.rename(tmp, out)
        except OSError:
            raise UserError(f"output dir {out}: another process wrote it while this build ran (rerun to check "
                            f"that it holds this build)") from None
        phase("write")
    except OSError as exc:  # a full disk (ENOSPC), a file too large (EFBIG), a read-only file system
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"output dir {out}: writing failed: {exc.strerror or exc} (nothing was written; "
                        f"the temp dir {tmp.name} is removed)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def summary_line(manifest: dict, out: str | os.PathLike) -> str:
    """One line: rows read/used/rejected (by reason), lines emitted, leaks, where it went."""
    counts = manifest["counts"].values()
    read, used, rejected = (sum(c[k] for c in counts) for k in ("read", "used", "rejected"))
    reasons = Counter()
    for c in counts:
        reasons.update(c["rejected_by_reason"])
    emitted = {kind: "+".join(str(manifest["outputs"][f"{kind}/{split}.jsonl"]["lines"]) for split in SPLITS)
               for kind in output_kinds(manifest["options"].get("subsets", DEFAULT_SUBSETS))}
    leaked = sum(manifest["leakage"]["leaked_rows"].values())
    state = "up to date, nothing rewritten: " if manifest.get("up_to_date") else ""
    why = f" ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})" if reasons else ""
    return (f"data_prep: {state}{read} rows read, {used} used, {rejected} rejected{why}; "
            f"{', '.join(f'{kind} {lines}' for kind, lines in emitted.items())} (train+validation); "
            f"{leaked} leaked train rows {'kept' if manifest['options']['keep_leaked'] else 'removed'} -> {out}")
