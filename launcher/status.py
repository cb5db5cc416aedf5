"""`./launch.sh status RUN_DIR|STAGE_DIR [--json]`: every stage of a run, run here or on SLURM.

One row per stage dir (data, training stages, convert entries, eval, its) and per job in RUN_DIR/jobs.json:
its state, progress (step / total and ETA for a training stage, prompts done for its, generations cached
for eval), its key metric (summary.json) and, for a SLURM job, the job id, its state in SLURM and the last
line of its log. Given a stage dir (one with config.yaml, summary.json or progress.json), just that stage.

Every file it reads may be missing, cut short by a crash or written by someone else: a file it cannot
use becomes a note in the row (`summary.json: not JSON`), never a traceback; the command then still
shows everything else.

States: finished (summary.json and config.yaml), running (another process or job holds OUT/.lock, or
SLURM says RUNNING), preempted (OUT/PREEMPTED), stopped (started, not finished, nobody writing: rerun the
same command to resume), rendered (a Megatron job's files written at submission, not run yet), pending
(a SLURM job still queued); a stage linked in from another run by base_run= says so in its notes.
--json prints the same rows as JSON (for scripts).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import yaml

from hs3.io import UserError
from recipes import preemption
from recipes.curves import PROGRESS_FILE, duration

# Row order: pipeline entries in the order the presets run them; anything else after them, by name.
ORDER = ("data", "import", "sft", "sft_export", "feedback", "select", "rm", "rm_export", "rl", "rl_export",
         "dpo", "dpo_export", "eval", "its")
STAGE_FILES = ("config.yaml", "summary.json", "progress.json", "manifest.json")


# ---- reading files that may be anything --------------------------------------------------------

def read_json(path: Path, notes: list[str], kind: type = dict):
    """The JSON value in path when it is a `kind`; None (and a note) when it is absent-but-expected,
    unreadable, not JSON or of another shape."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        notes.append(f"{path.name}: unreadable ({type(exc).__name__})")
        return None
    try:
        value = json.loads(text)
    except ValueError:
        notes.append(f"{path.name}: not JSON" + (" (empty)" if not text.strip() else " (cut short?)"))
        return None
    if not isinstance(value, kind):
        shape = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")
        notes.append(f"{path.name}: a JSON {shape}, not an object")
        return None
    return value


def read_config(path: Path, notes: list[str]) -> dict | None:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        notes.append("config.yaml: unreadable")
        return None
    if not isinstance(value, dict):
        notes.append("config.yaml: not a mapping")
        return None
    return value


def number(value) -> float | None:
    """A finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        return None
    return value


def describe_progress(progress: dict, notes: list[str], now: float | None = None) -> str:
    """`step 40/100 (40%), 12m00s elapsed, ETA 18m00s` from progress.json, using only the fields that
    have the right type (a field of another type is a note)."""
    fields = {}
    for key in ("step", "max_steps", "elapsed_s", "eta_s", "updated"):
        if key in progress and progress[key] is not None:
            fields[key] = number(progress[key])
            if fields[key] is None:
                notes.append(f"progress.json: {key} is not a number")
    step, total = fields.get("step"), fields.get("max_steps")
    if step is None:
        return ""
    text = f"step {int(step)}" + (f"/{int(total)}" if total else "")
    if total and total > 0:
        text += f" ({int(100 * step // total)}%)"
    if fields.get("elapsed_s") is not None:
        text += f", {duration(fields['elapsed_s'])} elapsed"
    if progress.get("finished") is True:
        return text
    if fields.get("eta_s") is not None:
        now = now or time.time()
        age = max(0.0, now - (fields.get("updated") or now))
        text += f", ETA {duration(max(0.0, fields['eta_s'] - age))}"
    return text


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def last_line(path: str | Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4096, 0))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()]
    except (OSError, TypeError, ValueError):
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


# ---- one stage dir -----------------------------------------------------------------------------

def latest_step(out: Path) -> int | None:
    steps = [int(m.group(1)) for p in out.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return max(steps) if steps else None


def metric_text(summary: dict | None, notes: list[str]) -> str:
    if not summary:
        return ""
    metric, value = summary.get("metric"), summary.get("value")
    if not isinstance(metric, str):
        notes.append("summary.json: no metric name")
        return ""
    if value is None:
        return metric
    if number(value) is None:
        notes.append(f"summary.json: value of {metric} is not a number")
        return metric
    return f"{metric} = {value:.4g}"


def stage_row(name: str, out: Path) -> dict:
    """State, progress, key metric and notes of one stage dir."""
    notes: list[str] = []
    row = {"stage": name, "state": "", "progress": "", "metric": "", "notes": notes, "out": str(out)}
    if out.is_symlink():
        notes.append(f"linked from {os.readlink(out)}")
    if not out.is_dir():
        row["state"] = "not started"
        return row
    config = read_config(out / "config.yaml", notes)
    stage = config.get("stage") if config else None
    summary = read_json(out / "summary.json", notes)
    progress = read_json(out / PROGRESS_FILE, notes)
    row["metric"] = metric_text(summary, notes)
    if summary is not None and summary.get("metric") == "dry-run":
        summary = None
    holder = None
    try:
        holder = preemption.OutputLock(out).holder()
    except Exception as exc:  # a lock file of another shape: say so, show the rest
        notes.append(f"{preemption.LOCK_FILE}: unreadable ({type(exc).__name__})")
    if progress:
        row["progress"] = describe_progress(progress, notes)
    step = latest_step(out)
    if stage == "its" or (out / "progress.jsonl").is_file():
        done = count_lines(out / "progress.jsonl")
        row["progress"] = f"{done} prompts done" if done else row["progress"]
    elif stage == "eval" and not summary:
        cached = sum(count_lines(p) for p in (out / "cache").glob("*.jsonl"))
        row["progress"] = f"{cached} generations cached" if cached else row["progress"]
    if summary and config is not None:
        row["state"] = "finished"
    elif holder:
        row["state"] = f"running ({holder})"
    elif (out / preemption.PREEMPTED_MARKER_FILE).exists():
        row["state"] = "preempted" + (f" at checkpoint-{step}" if step is not None else "")
    elif summary and config is None:
        row["state"] = "stopped (summary.json without config.yaml: rerun to finish)"
    elif progress or step is not None or (out / "progress.jsonl").is_file() or (out / "cache").is_dir():
        row["state"] = "stopped" + (f" at checkpoint-{step}" if step is not None else "") + " (rerun to resume)"
    elif config and config.get("executor") == "slurm":
        row["state"] = "rendered (its job has not started)"
    elif config is not None:
        row["state"] = "started"
    else:
        row["state"] = "empty"
    wall = number(summary.get("wall_s")) if summary else None
    if row["state"] == "finished" and wall is not None and not row["progress"]:
        row["progress"] = f"done in {duration(wall)}"
    return row


def is_stage_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in STAGE_FILES) or (path / "final").is_dir()


def order_key(name: str) -> tuple:
    return (ORDER.index(name), "") if name in ORDER else (len(ORDER), name)


# ---- SLURM jobs --------------------------------------------------------------------------------

def job_rows(run_dir: Path, notes: list[str]) -> dict[str, dict]:
    """RUN_DIR/jobs.json entries that are usable: name -> {job_id, out, log}."""
    jobs = read_json(run_dir / "jobs.json", notes)
    rows = {}
    for name, entry in (jobs or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("job_id"), (str, int)) or isinstance(entry.get("job_id"), bool):
            notes.append(f"jobs.json: entry {name!r} has no job id")
            continue
        rows[str(name)] = {"job_id": str(entry["job_id"]),
                           "out": entry.get("out") if isinstance(entry.get("out"), str) else None,
                           "log": entry.get("log") if isinstance(entry.get("log"), str) else ""}
    return rows


def slurm_state(job_id: str) -> tuple[str, str]:
    """(state, elapsed) from scontrol; ('', '') when SLURM does not know the job (or is not here)."""
    from launcher.slurm import scontrol_job

    info = scontrol_job(job_id)
    if not info:
        return "", ""
    state = info.get("JobState", "?")
    if state == "PENDING" and info.get("Reason") not in (None, "None"):
        state += f" ({info['Reason']})"
    if info.get("Restarts", "0") != "0":
        state += f", restarts={info['Restarts']}"
    return state, info.get("RunTime", "")


def merged_state(files: str, slurm: str, elapsed: str) -> str:
    """The stage's state from its files, refined by what SLURM says of its job."""
    if files.startswith(("finished", "running")):
        return files
    word = slurm.split()[0].rstrip(",") if slurm else ""
    if word == "PENDING":
        return "pending" + slurm[len(word):]
    if word in ("RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
        return "running" + (f" ({elapsed})" if elapsed else "")
    if word in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
        return f"{word.lower()}" + (f", {files}" if files.startswith(("stopped", "preempted")) else "")
    if not slurm and files in ("not started", "empty", "started"):
        return "gone (SLURM forgot the job; no summary.json)"
    return files


# ---- the command -------------------------------------------------------------------------------

def collect(path: Path) -> tuple[list[dict], list[str], bool]:
    """(rows, run-level notes, whether any row is a SLURM job)."""
    notes: list[str] = []
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (give a run dir or a stage dir)")
    if is_stage_dir(path) and not (path / "jobs.json").exists():
        return [stage_row(path.name, path)], notes, False
    jobs = job_rows(path, notes)
    names = {p.name for p in path.iterdir() if p.is_dir() and p.name not in ("slurm",) and is_stage_dir(p)}
    rows = []
    for name in sorted(names | set(jobs), key=order_key):
        job = jobs.get(name)
        out = Path(job["out"]) if job and job["out"] else path / name
        row = stage_row(name, out)
        if job:
            row["job"] = job["job_id"]
            row["last"] = last_line(job["log"])
            sstate, elapsed = slurm_state(job["job_id"])
            row["slurm"] = (sstate + (f" {elapsed}" if elapsed else "")) if sstate else "unknown to SLURM"
            row["state"] = merged_state(row["state"], sstate, elapsed)
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no stage has started there (no stage dirs, no jobs.json)")
    return rows, notes, bool(jobs)


def print_rows(title: str, rows: list[dict], notes: list[str], slurm: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ["stage", "state", "progress", "key metric"] + (["job", "SLURM", "last log line"] if slurm else []) + ["notes"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        cells = [row["stage"], row["state"], row["progress"], row["metric"]]
        if slurm:
            cells += [row.get("job", ""), row.get("slurm", ""), row.get("last", "")[-120:]]
        table.add_row(*cells, "; ".join(row["notes"]))
    console = Console(width=max(Console().width, 160))
    console.print(table)
    for note in notes:
        print(f"note: {note}")
    counts: dict[str, int] = {}
    for row in rows:
        key = row["state"].split()[0].rstrip(",").lower() if row["state"] else "?"
        counts[key] = counts.get(key, 0) + 1
    print(f"{len(rows)} stage{'s' if len(rows) != 1 else ''}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


def main(argv: list[str]) -> int:
    """./launch.sh status RUN_DIR|STAGE_DIR [--json]"""
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    if len(argv) != 1 or argv[0].startswith("-"):
        raise UserError("usage: ./launch.sh status RUN_DIR|STAGE_DIR [--json] (e.g. runs/smoke or runs/smoke/sft)")
    path = Path(argv[0])
    rows, notes, slurm = collect(path)
    if as_json:
        print(json.dumps({"path": str(path), "stages": rows, "notes": notes}, indent=1))
        return 0
    print_rows(f"{path}" + (" (SLURM jobs)" if slurm else ""), rows, notes, slurm)
    return 0
