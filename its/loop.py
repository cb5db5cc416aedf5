"""The `its` stage: Feedback-Edit inference-time scaling over a file of prompts.

    ./launch.sh its prompts=FILE policy=M feedback_model=M edit_model=M select_model=M \
        its.responses=N its.feedbacks=F its.edits=E its.feedback_pick=random|keywords out=DIR

For each prompt (docs/its.md has the procedure and its sources):
  1. the policy writes N responses;
  2. the Feedback model writes F feedback texts per response, asked with
     data_prep.feedback_prompt.build_feedback_request (its.feedback_instruction, or our reconstruction);
  3. feedback starting `The response is perfectly` is dropped; up to its.max_kept of the rest are kept,
     its.feedback_sets times per response (its/feedback.py: random, or the seed's keyword rerank);
  4. the Edit model writes E edits per kept set, asked in the seed's exact edit-request format
     (data_prep.build_edit_conversation);
  5. the Select model scores every candidate (responses and edits) as [context..., assistant: text];
     the answer is the best finished candidate: a candidate cut at its max_new_tokens (finish_reason
     "length") never beats one that ended its turn; among equals the higher score wins, then the earlier
     candidate (a response before its edits). A NaN or infinite score is a failed request (recorded).
Every sampled request has its own seed, request_seed(run seed, prompt id, step, index...), so the N
responses, F feedback texts and E edits are independent draws and a rerun asks the same.
Prompts run concurrently, its.prompts_in_flight at a time, each through its steps: a prompt's edits wait
for its own feedback only, never for other prompts'. Each model takes requests from every prompt in
flight (its.concurrency per endpoint, its.concurrency_by_role per role; a local model batches them).
Every generation and score is cached under OUT/cache as it arrives, and every finished prompt is
appended to OUT/progress.jsonl, so a rerun after a crash resumes where it stopped. A request that fails
after its retries is recorded with its error in the prompt's record and counted in summary.json; it does
not stop the run (a rerun asks again for the prompts with a failed request, from their cached calls).

Outputs: OUT/results.jsonl (one line per prompt, in the prompts' order), OUT/summary.json (calls,
tokens and busy seconds per model; cut candidates and finals; the select score of the first response
vs the final, `select_score_gain`: a proxy, >= 0 by construction since the final is the Select model's
own pick; the quality figure is its-eval's judge win rate), OUT/report.md + OUT/select_scores.png,
OUT/config.yaml, OUT/rejected.jsonl (prompt rows that could not be used, with the line and reason).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

from data_prep import build_edit_conversation
from data_prep.feedback_prompt import build_feedback_request, helpfulness_level
from eval.engines import Sampling
from its.feedback import pick_sets
from recipes.config import ConfigError, to_yaml
from hs3.io import UserError, atomic_write_json, atomic_write_jsonl, atomic_write_text, dumps_json, read_jsonl

ROLES = ("system", "user", "assistant")


# ---- prompts -------------------------------------------------------------------------------------

def _messages(row: dict) -> list[dict]:
    """A row's conversation: `messages` (a list of {role, content}), or `prompt` (a string = one user turn,
    or a list of turns). It must end with a user turn. ValueError says what is wrong."""
    value = row.get("messages", row.get("prompt"))
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError("no `messages` list or `prompt` string")
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError("a turn is not {role: system|user|assistant, content: string}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if turns[-1]["role"] != "user":
        raise ValueError("the last turn is not the user's")
    return turns


def load_prompts(cfg) -> tuple[list[dict], list[dict]]:
    """([{id, messages}], rejected rows with their line and reason). its.prompts (UTF-8, a leading BOM
    accepted), or else the contexts of the HelpSteer3 edit rows in data_dir/prompts/SPLIT.jsonl (each edit
    prompt without its original response and edit request; one per context)."""
    its = cfg.its
    prompts: list[dict] = []
    rejected: list[dict] = []
    if its.prompts:
        path = Path(its.prompts)
        if not path.is_file():
            raise UserError(f"its.prompts={path}: no such file (JSONL of {{id, messages}} or {{id, prompt}})")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserError(f"its.prompts={path}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                            f"expected JSONL of {{id, messages}} or {{id, prompt}}") from None
        except OSError as exc:
            raise UserError(f"its.prompts={path}: cannot read it ({exc.strerror or exc})") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = None
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                if "id" in row and (not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool)):
                    raise ValueError("`id` is not a string or an integer")
                messages = _messages(row)
            except (ValueError, RecursionError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                rejected.append({"line": n, "id": row.get("id") if isinstance(row, dict) else None,
                                 "reason": reason[:300]})
                continue
            prompts.append({"id": str(row.get("id", f"line{n}")), "messages": messages})
    else:
        path = Path(cfg.data_dir) / "prompts" / f"{its.split}.jsonl"
        if not path.is_file():
            raise UserError(f"no its.prompts and no {path} (pass prompts=FILE, or prepare the data: ./launch.sh data)")
        seen = set()
        for row in read_jsonl(path):
            context = row["prompt"][:-2]  # context + assistant(original) + user(edit request)
            key = json.dumps(context, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            prompts.append({"id": str(row["id"]), "messages": [{"role": t["role"], "content": t["content"]} for t in context]})
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path}: prompt id {dup!r} appears more than once (ids name the results and the resume)")
    if its.max_prompts >= 0:
        prompts = prompts[:its.max_prompts]
    if not prompts:
        first = f"; line {rejected[0]['line']}: {rejected[0]['reason']}" if rejected else ""
        raise UserError(f"{path}: no usable prompt ({len(rejected)} rejected{first})")
    return prompts, rejected


# ---- settings ------------------------------------------------------------------------------------

SEEDING = "per-request-v2"  # how request seeds are derived (part of settings_key: older records are not reused)


def request_seed(run_seed: int, prompt_id: str, step: str, *index: int) -> int:
    """The seed of one sampled request: a 31-bit hash of (run seed, prompt id, step, index...). Distinct
    for every response, feedback text and edit of every prompt, the same on every rerun and machine, and
    independent of which other prompts or requests exist (or share a batch)."""
    blob = "/".join([str(run_seed), prompt_id, step, *map(str, index)])
    return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def samplings(cfg) -> dict[str, Sampling]:
    its = cfg.its

    def temperature(value: Optional[float], n: int) -> float:
        return (0.0 if n == 1 else 0.7) if value is None else float(value)

    def make(temp: float, tokens: int) -> Sampling:
        return Sampling(max_new_tokens=tokens, temperature=temp, top_p=its.top_p if temp > 0 else 1.0, seed=cfg.seed)

    return {"policy": make(temperature(its.response_temperature, its.responses), its.max_new_tokens),
            "feedback_model": make(float(its.feedback_temperature), its.feedback_max_new_tokens),
            "edit_model": make(temperature(its.edit_temperature, its.edits), its.max_new_tokens)}


def settings_key(cfg, models) -> str:
    """What a finished prompt's record depends on: a record made under other settings is not reused."""
    its = cfg.its
    keys = ("responses", "feedbacks", "feedback_sets", "edits", "feedback_pick", "max_kept", "feedback_instruction",
            "response_temperature", "feedback_temperature", "edit_temperature", "top_p", "max_new_tokens",
            "feedback_max_new_tokens")
    blob = {k: its[k] for k in keys}
    blob["seed"] = cfg.seed
    blob["seeding"] = SEEDING
    blob["models"] = {r: g.engine.model_id for r, g in models.generators.items()}
    blob["select"] = models.selector.model_id
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ---- one prompt ----------------------------------------------------------------------------------

def _gen(generation) -> dict:
    d = {"text": generation.text, "finish_reason": generation.finish_reason}
    if generation.error:
        d["error"] = generation.error
    return d


def run_prompt(cfg, models, prompt: dict, sampling: dict[str, Sampling]) -> dict:
    """One prompt through the five steps; each step waits for this prompt's previous one only."""
    its = cfg.its
    pid = prompt["id"]
    # 1. N responses
    requests = [(prompt["messages"], request_seed(cfg.seed, pid, "response", j)) for j in range(its.responses)]
    generated = models.generators["policy"].generate(requests, sampling["policy"])
    record = {"id": pid, "prompt": prompt["messages"],
              "candidates": [{"index": j, **_gen(g)} for j, g in enumerate(generated)]}
    live = [c for c in record["candidates"] if "error" not in c]
    # 2. F feedback texts per response
    requests = [(build_feedback_request(prompt["messages"], c["text"], its.feedback_instruction),
                 request_seed(cfg.seed, pid, "feedback", c["index"], f)) for c in live for f in range(its.feedbacks)]
    feedback = models.generators["feedback_model"].generate(requests, sampling["feedback_model"]) if requests else []
    # 3. kept feedback sets
    edit_requests, edit_slots = [], []
    for n, c in enumerate(live):
        texts = feedback[n * its.feedbacks:(n + 1) * its.feedbacks]
        c["feedback"] = [{**_gen(g), "level": helpfulness_level(g.text)} for g in texts]
        ok = [g.text for g in texts if g.error is None]
        c["kept_feedback"] = pick_sets(ok, its.feedback_pick, its.max_kept, its.feedback_sets,
                                       f"{cfg.seed}/{pid}/{c['index']}")
        c["edits"] = []
        for s, kept in enumerate(c["kept_feedback"]):
            conversation = build_edit_conversation(prompt["messages"], c["text"], kept)  # <= 3 usable items: as given
            for e in range(its.edits):
                edit_requests.append((conversation, request_seed(cfg.seed, pid, "edit", c["index"], s, e)))
                edit_slots.append((c, s, e))
    # 4. E edits per kept set
    edits = models.generators["edit_model"].generate(edit_requests, sampling["edit_model"]) if edit_requests else []
    for (c, s, e), g in zip(edit_slots, edits):
        c["edits"].append({"set": s, "sample": e, **_gen(g)})
    # 5. score every candidate; the best finished one is the answer
    items = [item for c in live for item in [c, *[x for x in c["edits"] if "error" not in x]]]
    scores = models.selector.score([prompt["messages"] + [{"role": "assistant", "content": x["text"]}] for x in items]) \
        if items else []
    for item, score in zip(items, scores):
        item["score"] = score
    record["final"] = choose(record["candidates"])
    return record


def has_failure(record: dict) -> bool:
    """A request of this prompt failed (a rerun asks again: failures are never cached)."""
    for c in record["candidates"]:
        if "error" in c:
            return True
        items = [c, *c.get("edits", [])]
        if any("error" in x for x in [*c.get("feedback", []), *c.get("edits", [])]) or \
                any(x.get("score") is None for x in items if "error" not in x):
            return True
    return False


def is_cut(item: dict) -> bool:
    """Generation stopped at its max_new_tokens instead of ending its turn: never a finished answer."""
    return item.get("finish_reason") == "length"


def choose(candidates: list[dict]) -> Optional[dict]:
    """The best scored candidate: a finished one (ended its turn) over any cut one, then the higher score;
    responses in order, each followed by its edits; the first of equals wins. None when nothing was scored."""
    best, best_rank = None, None
    for c in candidates:
        for edit in [None, *c.get("edits", [])]:
            item = edit or c
            if item.get("score") is None or "error" in item:
                continue
            rank = (not is_cut(item), item["score"])
            if best is None or rank > best_rank:
                best_rank = rank
                best = {"text": item["text"], "score": item["score"], "source": "edit" if edit else "response",
                        "response": c["index"], "finish_reason": item.get("finish_reason")}
                if edit:
                    best.update({"set": edit["set"], "sample": edit["sample"],
                                 "kept_feedback": c["kept_feedback"][edit["set"]]})
    return best


# ---- the stage -----------------------------------------------------------------------------------

def is_tiny(spec: str) -> bool:
    """A local model with a hidden size under 256: this project's test models (their numbers mean nothing)."""
    try:
        config = json.loads((Path(spec) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return int(config.get("hidden_size", 1 << 20)) < 256


def run(cfg, endpoints: Optional[dict[str, str]] = None) -> dict:
    """The `its` stage. `endpoints` (role -> URL) replaces model dirs by servers started for them
    (launcher/its_job.py); OUT/config.yaml keeps the config as given."""
    from recipes.preemption import OutputLock

    out = Path(cfg.out)
    check_out_dir(out)
    prompts, rejected = load_prompts(cfg)
    if cfg.dry_run:
        its = cfg.its
        missing = [r for r in ("policy", "feedback_model", "edit_model", "select_model") if not its[r]]
        if missing:
            raise UserError("its needs " + ", ".join(f"{r}=M" for r in missing) +
                            " (a checkpoint dir or an OpenAI-compatible endpoint)")
        print(f"its: {len(prompts)} prompts ({len(rejected)} rejected) x {its.responses} responses x {its.feedbacks} "
              f"feedback -> {its.feedback_sets} set(s) of <= {its.max_kept} ({its.feedback_pick}) x {its.edits} edits; "
              f"policy={its.policy} feedback={its.feedback_model} edit={its.edit_model} select={its.select_model}")
        return {"stage": "its", "metric": "dry-run", "value": None, "out": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        return _run(cfg, out, prompts, rejected, endpoints)


# What an its run writes into OUT (and `.NAME.XXXX`, an atomic write under way); with OUT/config.yaml of
# stage its, anything else there is left alone.
ITS_OUTPUTS = ("summary.json", "config.yaml", "progress.jsonl", "results.jsonl", "rejected.jsonl", "report.md",
               "select_scores.png", "cache", "servers", ".lock")


def check_out_dir(out: Path) -> None:
    """Refuse, before anything is written or removed, an OUT that holds files an its run did not write:
    a rerun replaces config.yaml, summary.json and results.jsonl, so OUT is new, empty, an earlier its run
    (its config.yaml says stage: its) or one that stopped before writing config.yaml (only its own files)."""
    from recipes.config import load_yaml
    from recipes.preemption import out_dir_names

    names = out_dir_names(out)
    if names is None:
        return
    if "config.yaml" in names:
        try:
            stage = load_yaml(out / "config.yaml").get("stage")
        except ConfigError as exc:
            raise ConfigError(f"out={out}: its config.yaml is damaged or not this project's ({exc}); move it away or "
                              "pick another out=") from None
        if stage != "its":
            raise ConfigError(f"out={out}: holds the config.yaml of {'stage ' + repr(stage) if stage else 'something else'}, "
                              "not of an its run (a rerun would replace it); pick another out= (a new or empty dir)")
        return
    foreign = [n for n in names if n not in ITS_OUTPUTS and not any(n.startswith(f".{o}.") for o in ITS_OUTPUTS)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"out={out}: holds files an its run did not write ({shown}); its writes only into a new or "
                          "empty dir, or into its own earlier run (pick another out=)")


def _read_progress(path: Path, key: str) -> dict[str, dict]:
    """Finished prompts of earlier runs with these settings and no failed request (a line cut by a crash,
    or one that is not such a record, is skipped)."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            record = entry["record"]
            if entry.get("settings") == key and isinstance(record.get("id"), str) and not has_failure(record):
                done[record["id"]] = record
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return done


def _run(cfg, out: Path, prompts: list[dict], rejected: list[dict], endpoints) -> dict:
    import threading
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from its.models import Models
    from its.report import write_report

    started = time.monotonic()
    for name in ("summary.json", "config.yaml"):  # a rerun is unfinished until it writes them again
        (out / name).unlink(missing_ok=True)
    models = Models(cfg, out / "cache", endpoints)
    key = settings_key(cfg, models)
    progress_path = out / "progress.jsonl"
    done = _read_progress(progress_path, key)
    wanted = {p["id"] for p in prompts}
    resumed = len(wanted & set(done))
    todo = [p for p in prompts if p["id"] not in done]
    if resumed:
        print(f"[its] resuming: {resumed} of {len(prompts)} prompts finished earlier", file=sys.stderr)
    sampling = samplings(cfg)
    write_lock = threading.Lock()
    every = max(1, min(cfg.its.prompts_in_flight, len(todo) // 20 or 1))
    finished = resumed
    pool = ThreadPoolExecutor(max_workers=cfg.its.prompts_in_flight, thread_name_prefix="its-prompt")
    futures = []
    try:
        futures = [pool.submit(run_prompt, cfg, models, p, sampling) for p in todo]
        for future in as_completed(futures):
            record = future.result()
            with write_lock:
                done[record["id"]] = record
                with open(progress_path, "a", encoding="utf-8") as f:
                    f.write(dumps_json({"settings": key, "record": record}) + "\n")
            finished += 1
            if finished % every == 0 or finished == len(prompts):
                print(f"[its] {finished}/{len(prompts)} prompts ({time.monotonic() - started:.0f}s)", file=sys.stderr)
    except BaseException:
        models.halt()  # the prompts still in flight stop at their next request; finished ones are recorded
        for future in futures:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        models.close()
    records = [done[p["id"]] for p in prompts]
    atomic_write_jsonl(out / "results.jsonl", records)
    atomic_write_jsonl(out / "rejected.jsonl", rejected)
    summary = summarize(cfg, records, models, rejected, resumed, time.monotonic() - started)
    gain = summary["select_score"]["gain"]
    summary = {"stage": "its", "metric": "select_score_gain (proxy)", "value": gain, "out": str(out), **summary}
    atomic_write_json(out / "summary.json", summary)
    write_report(summary, records, out)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))  # last: with summary.json it marks the stage done
    print(f"[its] {len(records)} prompts: select score of the first response {summary['select_score']['first_mean']}, "
          f"of the final {summary['select_score']['final_mean']} (select_score_gain {gain}: a proxy, the Select model "
          f"grading its own pick; judge quality with its-eval); finals that are edits {summary['edit_share']}, cut "
          f"{summary['finals_cut']}; {summary['failed_requests']} failed requests -> {out}/results.jsonl")
    return {"stage": "its", "metric": "select_score_gain (proxy)", "value": gain, "out": str(out)}


def _mean(values: list[float]) -> Optional[float]:
    return round(sum(values) / len(values), 6) if values else None


def summarize(cfg, records: list[dict], models, rejected: list[dict], resumed: int, seconds: float) -> dict:
    its = cfg.its
    pairs = [(r["candidates"][0].get("score"), r["final"]["score"]) for r in records
             if r["final"] and r["candidates"][0].get("score") is not None]
    finals = [r["final"] for r in records if r["final"]]
    stats = models.stats()
    feedback = [f for r in records for c in r["candidates"] for f in c.get("feedback", []) if "error" not in f]
    responses = [c for r in records for c in r["candidates"] if "error" not in c]
    edits = [e for c in responses for e in c.get("edits", []) if "error" not in e]
    specs = [its.policy, its.feedback_model, its.edit_model, its.select_model]
    notes = []
    if any(s and is_tiny(str(s)) for s in specs):
        notes.append("Tiny test models: these numbers exercise the loop and mean nothing about quality.")
    notes.append("select_score_gain is a proxy: the Select model's score of the final minus that of the first "
                 "response, >= 0 by construction when the first response is finished (the final is the Select "
                 "model's own pick). The quality figure is the judge's win rate: ./launch.sh its-eval OUT OUT:first "
                 "judge=URL.")
    return {
        "prompts": len(records), "rejected_prompts": len(rejected), "resumed_prompts": resumed,
        "settings": {k: its[k] for k in ("responses", "feedbacks", "feedback_sets", "edits", "feedback_pick", "max_kept",
                                         "max_new_tokens", "feedback_max_new_tokens")},
        "models": stats,
        "wall_seconds": round(seconds, 3),
        "select_score": {"first_mean": _mean([a for a, _ in pairs]), "final_mean": _mean([b for _, b in pairs]),
                         "gain": _mean([b - a for a, b in pairs]), "prompts_scored": len(pairs),
                         "is_proxy": True},
        "edit_share": round(sum(f["source"] == "edit" for f in finals) / len(finals), 6) if finals else None,
        "no_final": len(records) - len(finals),
        "cut": {"responses": sum(map(is_cut, responses)), "of_responses": len(responses),
                "edits": sum(map(is_cut, edits)), "of_edits": len(edits)},
        "finals_cut": sum(map(is_cut, finals)),
        "feedback": {"texts": len(feedback),
                     "perfectly_helpful": sum(f["text"].startswith("The response is perfectly") for f in feedback),
                     "responses_without_kept_feedback": sum(1 for c in responses if not c.get("kept_feedback"))},
        "failed_requests": sum(s["errors"] for s in stats.values()),
        "notes": notes,
    }
