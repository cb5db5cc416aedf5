"""The eval stage: score one edit model on the held-out splits.

    ./launch.sh eval model=PATH_OR_ENDPOINT_OR_HUB_ID data=DATA_DIR [rm=PATH|null] [eval.max_rows=N] ...

Which model is scored, at which settings, into which dir: eval/target.py (init= when given, else exactly
what model= names, else the run's rl/final; each local model at its own dtype and sequence length;
${run_dir}/eval/NAME per model, a dir holding another model's eval refused). docs/eval.md.

Scorers: the training reward model (rm=, the proxy the policy was optimised against: proxy_* keys,
"training RM (optimised against)" in report.md), and the gold scorers, independent of training:
eval.gold_rm (a reward model of either kind, local or an endpoint: eval/reward_scorers.py) and the LLM
judge (eval.judge_endpoint: eval/judge.py). Their win rates are the gold_* keys.

Gold scoring refuses any model in the policy's lineage (eval/lineage.py: the policy, rm=, what their
training records name, copies and checkpoints of those).

Cut generations: each row records finish_reason (stop | length | error); the gold and proxy win rates
(reward models and judge) are over the finished rows, with the cut share beside them (cut_share,
counts.finish_reasons).

Provenance: report.json's meta.provenance names the model under test, every scorer (content fingerprints,
recipes/provenance.py), the data (dir, manifest sha256, split, row ids), the sampling and the prompt
budget; eval-compare checks them (eval/compare.py).

Failures and lengths: an endpoint request that still fails after its retries is recorded on its row
(`error`) and counted (counts.errors); the row is left out of the metrics and the eval goes on. Prompts
longer than eval.max_prompt_tokens are shortened by eval/prompts.py's rule (counts.prompts_shortened);
rows the data step flagged too long for training (`over_max_seq_len`) are counted (counts.flagged_too_long).

Writes into cfg.out: generations.jsonl (one line per edit/SPLIT row, with its generation and
metrics), likelihood.jsonl (one line per edit_quality pair, with its scores), report.json, report.md, metrics.png, copy_rate.png, length_ratio.png, summary.json,
config.yaml, and cache/ (generations so far: a rerun after a crash resumes from it).
"""
from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from recipes.config import to_yaml
from recipes.models import reward_head_mismatch
from hs3.io import UserError, atomic_write_json, atomic_write_jsonl, atomic_write_text, sha256_file

from eval import feedback_eval, select_eval
from eval import metrics as M
from eval.data import check_held_out, load_edit_rows, load_pairs, manifest_notes, training_record
from eval.engines import GenerationCache, HFEngine, HTTPEngine, Sampling, generate_cached, is_endpoint
from eval.lineage import check_gold
from eval.prompts import shorten_messages
from eval.reward_scorers import TINY_GOLD, load_scorer, resolve_spec
from eval.target import (Settings, check_config, claim_out_dir, describe_target, eval_task, generation_engine,
                         identity, local_dir, model_settings, model_under_test, target_settings)

# Summary metric of the stage: the first of these the report has (gold before anything the policy saw).
SUMMARY_METRICS = ("gold_reward_win_rate", "gold_judge_win_rate", "copy_rate")
HEADLINE = ("copy_rate", "gold_reward_win_rate", "gold_reward_win_rate_vs_reference", "gold_judge_win_rate",
            "gold_judge_win_rate_vs_reference", "chrf", "rouge_l", "proxy_reward_win_rate",
            "proxy_reward_win_rate_vs_reference", "gold_rm_accuracy", "rm_accuracy")


def reward_model_path(cfg, notes: list[str]) -> Optional[str]:
    """The rm checkpoint, or None. The pipeline's default (${run_dir}/rm/final) may be absent:
    the reward metrics are then skipped with a note; a path the user named must exist."""
    if not cfg.reward_model:
        return None
    if Path(cfg.reward_model).is_dir():
        return str(cfg.reward_model)
    if Path(cfg.reward_model) == Path(cfg.run_dir) / "rm" / "final":
        notes.append(f"no reward model at {cfg.reward_model}: reward metrics skipped (pass rm=PATH)")
        return None
    raise UserError(f"reward_model={cfg.reward_model}: no such checkpoint (pass rm=PATH, or rm=null to skip "
                    f"the reward metrics)")


def gold_dir(gold: Optional[str]) -> Optional[str]:
    """The local dir of eval.gold_rm (builtin:tiny-gold built here), None for an endpoint or none; a
    dir that is not there is a one-line error before anything loads."""
    if not gold or is_endpoint(str(gold)):
        return None
    path = resolve_spec(str(gold))
    if not Path(path).is_dir():
        raise UserError(f"eval.gold_rm={gold}: no such directory (a local model dir, {TINY_GOLD}, or an http(s) endpoint)")
    return path


def free_memory() -> None:
    """Release a model before the next one loads (on GPUs too: the policy and the rm may both be 70B)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True, leave=False)


def prompt_budget(cfg, engine) -> Optional[int]:
    """Most prompt tokens a row may have: eval.max_prompt_tokens; else the data build's --max-seq-len
    (manifest options: the length the training rows were held to; rows over it are the ones the data
    step flagged); else the local model's context minus max_new_tokens; else (an endpoint) no limit."""
    if cfg.eval.max_prompt_tokens:
        return int(cfg.eval.max_prompt_tokens)
    manifest = Path(cfg.data_dir) / "manifest.json"
    try:
        built_at = (json.loads(manifest.read_text(encoding="utf-8")).get("options") or {}).get("max_seq_len")
    except (OSError, ValueError, AttributeError):
        built_at = None
    if built_at:
        return int(built_at)
    if isinstance(engine, HFEngine):
        context = getattr(engine.model.config, "max_position_embeddings", None)
        if context and context > cfg.eval.max_new_tokens:
            return context - cfg.eval.max_new_tokens
    return None  # no room to give (or an endpoint): prompts go whole, the model or server decides


def shorten_prompts(cfg, engine, rows: list[dict], notes: list[str]) -> list[list[dict]]:
    """Each row's prompt, shortened by eval/prompts.py's rule when over the budget (row["prompt_shortened"])."""
    budget = prompt_budget(cfg, engine)
    tokenizer = getattr(engine, "tokenizer", None)
    if budget and tokenizer is None:
        if cfg.model.tokenizer:
            from recipes.models import load_tokenizer

            tokenizer = load_tokenizer(cfg.model, str(cfg.model.tokenizer))
        else:
            notes.append(f"eval.max_prompt_tokens={budget}: no tokenizer for the endpoint's model (set "
                         f"model.tokenizer=DIR): prompts sent whole")
            budget = None
    from jinja2 import TemplateError

    prompts = []
    for row in rows:
        prompt, shortened = row["prompt"], False
        if budget:
            try:
                prompt, shortened = shorten_messages(tokenizer, row["prompt"], budget, keep_last=2)
            except (TemplateError, TypeError, ValueError) as exc:  # the model's side will refuse it: recorded there
                notes.append(f"row {row['id']}: its prompt cannot be templated here ({type(exc).__name__}): sent as is")
        row["prompt_shortened"] = shortened
        prompts.append(prompt)
    return prompts


def run(cfg) -> dict:
    check_config(cfg)
    task = eval_task(cfg)  # a Feedback or Select model has its own eval (eval.task; auto: its training record)
    if task == "feedback":
        return feedback_eval.run(cfg)
    if task == "select":
        return select_eval.run(cfg)
    start = time.monotonic()
    e = cfg.eval
    out = Path(cfg.out)
    if cfg.dry_run:  # print what would run; load and check nothing
        print(to_yaml(cfg))
        print(f"eval: dry run, would score {model_under_test(cfg, check=False) or cfg.model.path} on "
              f"{cfg.data_dir} ({e.split}; training reward model: {cfg.reward_model}; gold reward model: "
              f"{e.gold_rm}; judge: {e.judge_endpoint}) -> {out}/report.json")
        return {"stage": "eval", "metric": "dry_run", "value": None, "wall_s": 0.0, "out": str(out)}
    target = model_under_test(cfg)
    model_name = target or str(cfg.model.path)
    notes: list[str] = []
    rm_path = reward_model_path(cfg, notes)
    if rm_path and (mismatch := reward_head_mismatch(rm_path)):  # before hours of generation, not after
        raise UserError(f"reward_model={rm_path}: {mismatch}")
    if not Path(cfg.data_dir).is_dir():
        raise UserError(f"data_dir={cfg.data_dir}: no such directory (pass data=DIR, a data_prep output dir)")
    model_dir = local_dir(cfg, target)  # a hub id that cannot be loaded stops here, before anything else

    # Held-out hygiene: nothing is scored on a split its model was trained on; gold is outside the lineage.
    splits = [f"edit/{e.split}", f"edit_quality/{e.split}"]
    model_record = training_record(model_dir)
    rm_record = training_record(rm_path)
    check_held_out(model_record, model_name, splits, "model")
    check_held_out(rm_record, str(rm_path), splits, "reward model")
    gold_path = gold_dir(e.gold_rm)
    notes += check_gold(e.gold_rm, gold_path, model_dir, rm_path)
    check_held_out(training_record(gold_path), str(e.gold_rm), splits, "gold reward model")
    notes += manifest_notes(cfg.data_dir, [(model_name, model_record)] + ([(rm_path, rm_record)] if rm_path else []))
    for note in notes:
        print(note)

    rows = load_edit_rows(cfg.data_dir, e.split, e.max_rows)
    pairs = load_pairs(cfg.data_dir, e.split, e.max_rows)
    claim_out_dir(out, identity(cfg, target))  # before anything is written or loaded
    sampling = Sampling(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, seed=cfg.seed)

    # 1. Generate an edit for every row (cached on disk as it goes), the model at its own settings.
    settings = None if target and is_endpoint(target) else target_settings(cfg, model_dir, target)
    engine = generation_engine(cfg, target, settings)
    provenance = {"model": describe_target(cfg, target, engine, settings)}
    prompts = shorten_prompts(cfg, engine, rows, notes)
    cache = GenerationCache(out / "cache" / "generations.jsonl")
    with _progress(len(rows), "generating edits") as bar:
        generations = generate_cached(engine, prompts, sampling, cache, progress=bar.update)
    records = []
    for row, generation in zip(rows, generations):
        original = row["original_response"]
        record = {"id": row["id"], "domain": row["domain"], "language": row["language"],
                  "generated": generation.text, "finish_reason": generation.finish_reason,
                  "completion_tokens": generation.completion_tokens,
                  "prompt_shortened": row["prompt_shortened"],
                  "flagged_too_long": bool(row.get("over_max_seq_len")),
                  "error": generation.error, "metrics": {}}
        if generation.error is None:
            record["metrics"] = M.row_metrics(generation.text, original, row["reference_edit"],
                                              generation.finish_reason, e.near_copy_chrf)
        records.append(record)
    failed = [r for r in records if r["error"] is not None]
    if failed:
        notes.append(f"{len(failed)} of {len(records)} rows failed after retries (first: {failed[0]['id']}: "
                     f"{failed[0]['error']}): recorded in generations.jsonl, left out of the metrics")
        print(notes[-1])
    cut = sum(r["finish_reason"] == "length" for r in records)
    if cut:
        notes.append(f"{cut} of {len(records) - len(failed)} edits were cut at eval.max_new_tokens={e.max_new_tokens}: "
                     f"left out of the gold and proxy win rates (cut_share)")
        print(notes[-1])

    # 2. The policy's preference between good and bad edits (needs the model's logits).
    pair_records = [{"id": p["id"], "kind": p["kind"], "domain": p.get("domain", "unknown"),
                     "language": p.get("language", "unknown"), "metrics": {}} for p in pairs]
    if e.policy_likelihood and isinstance(engine, HFEngine):
        policy_preference(engine, pairs, pair_records, cfg)
    elif isinstance(engine, HTTPEngine):
        notes.append("policy log-likelihood preference skipped: an endpoint gives no prompt log-probabilities")
    budget = prompt_budget(cfg, engine)
    del engine
    free_memory()

    # 3. Reward models: generated edit vs original and vs human edit; accuracy on the pairs. The
    #    training rm is the proxy (the policy was optimised against it); the gold rm is independent.
    failures = {"proxy_scorer": 0, "gold_scorer": 0, "judge": 0}
    gold_kind = None
    scorers: dict = {"proxy_rm": None, "gold_rm": None, "judge": None}
    if rm_path:
        rm_settings, note = proxy_settings(rm_path, cfg, model_record)
        if note:
            notes.append(note)
            print(note)
        proxy = proxy_scorer(rm_path, cfg, rm_settings)
        scorers["proxy_rm"] = scorer_provenance(rm_path, rm_path, proxy, rm_settings)
        failures["proxy_scorer"] = reward_model_metrics(proxy, "proxy", "edit_request", rows, records, pairs,
                                                        pair_records)
        failures["proxy_scorer_truncated"] = proxy.shortened
        del proxy
        free_memory()
    if e.gold_rm:
        gold_settings = model_settings(gold_path, e.dtype) if gold_path else None
        gold = load_scorer(gold_path or e.gold_rm, e.gold_rm_kind, dtype=gold_settings.dtype if gold_settings else "float32",
                           batch_size=e.batch_size, max_length=gold_settings.seq_len if gold_settings else None,
                           concurrency=e.concurrency, max_retries=e.max_retries, timeout_s=e.request_timeout_s,
                           api_key_env=e.api_key_env)
        scorers["gold_rm"] = {**scorer_provenance(str(e.gold_rm), gold_path, gold, gold_settings), "input": e.gold_rm_input}
        failures["gold_scorer"] = reward_model_metrics(gold, "gold", e.gold_rm_input, rows, records, pairs, pair_records)
        gold_kind = gold.kind
        failures["gold_scorer_truncated"] = gold.shortened
        if e.gold_rm == TINY_GOLD:
            notes.append(f"gold reward model {TINY_GOLD}: a tiny random causal LM (first_logit, seed 7), independent "
                         f"of training but knowing nothing: its figures show the format only")
        del gold
        free_memory()

    # 4. LLM judge (gold): the edit against the original and against the human edit, both orders.
    if e.judge_endpoint:
        from eval.judge import judge_edits
        from eval.metrics import JUDGE_TEMPLATE

        judge_info: dict = {}
        wins, failures["judge"] = judge_edits(rows, records, e, cfg.seed, out / "cache" / "judge.jsonl", judge_info)
        for record, row_wins in zip(records, wins):
            record["metrics"].update(row_wins)
        scorers["judge"] = {"path": e.judge_endpoint, "endpoint": True, "served_model": judge_info.get("served_model"),
                            "template_sha256": hashlib.sha256(JUDGE_TEMPLATE.encode()).hexdigest()}

    provenance.update(scorers=scorers, data=data_provenance(cfg, rows, pairs), sampling=asdict(sampling),
                      max_prompt_tokens=budget)
    report = build_report(cfg, model_name, rm_path, records, pair_records, sampling, notes, failures, gold_kind,
                          provenance)
    write_outputs(out, records, pair_records, report)
    metric = next((k for k in SUMMARY_METRICS if report.get(k) is not None), "copy_rate")
    summary = {"stage": "eval", "metric": metric, "value": report[metric], "out": str(out),
               "wall_s": round(time.monotonic() - start, 1)}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))  # last: with summary.json it marks the stage done
    headline = ", ".join(f"{k}={report[k]:.3g}" for k in HEADLINE if report.get(k) is not None)
    errors = f", {report['counts']['errors']} rows failed" if report["counts"]["errors"] else ""
    cut_note = f", {cut} cut (win rates over the finished)" if cut else ""
    print(f"eval: {model_name} on {len(rows)} rows + {len(pairs)} pairs{errors}{cut_note}: {headline} -> {out}/report.md")
    return summary


def data_provenance(cfg, rows: list[dict], pairs: list[dict]) -> dict:
    """The data a report was scored on: dir, manifest sha256, split, and the ids of its rows and pairs."""
    manifest = Path(cfg.data_dir) / "manifest.json"
    ids = "\n".join([r["id"] for r in rows] + [p["id"] for p in pairs])
    return {"dir": str(cfg.data_dir), "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
            "split": cfg.eval.split, "rows": len(rows), "pairs": len(pairs),
            "ids_sha256": hashlib.sha256(ids.encode("utf-8")).hexdigest()}


def scorer_provenance(spec: str, directory: Optional[str], scorer, settings: Optional[Settings]) -> dict:
    """A reward scorer for report.json: what was named, its dir and content fingerprint, its kind, and
    the settings it scored at; an endpoint: URL and served model."""
    from recipes.provenance import describe_model

    if directory is None:
        return {"path": spec, "endpoint": True, "served_model": getattr(scorer, "model", None), "kind": scorer.kind,
                "fingerprint": None}
    return {**describe_model(spec, directory), "kind": scorer.kind, "dtype": settings.dtype,
            "max_length": scorer.max_length, "settings_from": {"dtype": settings.dtype_from, "seq_len": settings.seq_len_from}}


def policy_preference(engine: HFEngine, pairs: list[dict], pair_records: list[dict], cfg) -> None:
    """Per good_vs_bad pair: does the good edit have the higher length-normalised log-likelihood?"""
    from eval.scoring import mean_logprobs

    chosen = [i for i, p in enumerate(pairs) if p["kind"] == "good_vs_bad"]
    prompts = [pairs[i]["prompt"] for i in chosen]
    with _progress(2 * len(chosen), "policy log-likelihood") as bar:
        good, bad = (mean_logprobs(engine.model, engine.tokenizer, prompts, [pairs[i][side][-1]["content"] for i in chosen],
                                   cfg.eval.batch_size, bar.update) for side in ("chosen", "rejected"))
    for i, lp_good, lp_bad, correct in zip(chosen, good, bad, M.pair_accuracy(good, bad)):
        pair_records[i]["metrics"].update({"logprob_chosen": lp_good, "logprob_rejected": lp_bad, "policy_correct": correct})


def proxy_settings(rm_path: str, cfg, policy_record: Optional[dict]) -> tuple[Settings, Optional[str]]:
    """How the training reward model scores here: as rl scored it when the policy's training record names
    this reward model (same path or content fingerprint) with its scoring (max_length, dtype); else at the
    rm's own settings (its hs3_training.json, else config.json). A note when the record names another one."""
    from recipes.provenance import model_fingerprint

    own = model_settings(rm_path, cfg.eval.dtype)
    entry = ((policy_record or {}).get("inputs") or {}).get("reward_model")
    if not isinstance(entry, dict) or not entry.get("path"):
        return own, None
    same = (entry.get("resolved") or str(Path(entry["path"]).resolve())) == str(Path(rm_path).resolve()) or (
        entry.get("fingerprint") is not None and entry.get("fingerprint") == model_fingerprint(rm_path))
    if not same:
        return own, (f"note: rm={rm_path} is not the reward model the policy was trained against ({entry['path']}, "
                     f"per its hs3_training.json): the proxy figures are another scorer's")
    scoring = entry.get("scoring") if isinstance(entry.get("scoring"), dict) else {}
    source = "the policy's hs3_training.json (how rl scored)"
    dtype, dtype_from = own.dtype, own.dtype_from
    if scoring.get("dtype") and cfg.eval.dtype == "auto":
        dtype, dtype_from = scoring["dtype"], source
    seq_len, seq_len_from = own.seq_len, own.seq_len_from
    if isinstance(scoring.get("max_length"), int) and scoring["max_length"] > 0:
        seq_len, seq_len_from = scoring["max_length"], source
    return replace(own, dtype=dtype, seq_len=seq_len, dtype_from=dtype_from, seq_len_from=seq_len_from), None


def proxy_scorer(rm_path: str, cfg, settings: Optional[Settings] = None):
    """The training reward model, scoring exactly as rm training and the RL reward do (edit prompt +
    edit, recipes.reward.score_conversations with its truncation rule) at `settings` (default: the rm's
    own: proxy_settings without a policy record)."""
    settings = settings or model_settings(rm_path, cfg.eval.dtype)
    return load_scorer(rm_path, "seqcls", dtype=settings.dtype, batch_size=cfg.eval.batch_size,
                       max_length=settings.seq_len)


def scored_conversation(prompt: list[dict], text: str, input_format: str) -> list[dict]:
    """What a reward model reads: the whole edit prompt + the edit (edit_request, like the training rm),
    or the context turns + the edit as the assistant's response (context: Select/Reward's format)."""
    turns = prompt if input_format == "edit_request" else prompt[:-2]
    return [*turns, {"role": "assistant", "content": text}]


def reward_model_metrics(scorer, prefix: str, input_format: str, rows: list[dict], records: list[dict],
                         pairs: list[dict], pair_records: list[dict]) -> int:
    """Scores each row's generated, original and human edit, and each pair's two sides; the wins
    (`{prefix}_win_vs_*`) and accuracies go into the records' metrics. Rows whose generation failed, and
    edits cut at max_new_tokens (no finished edit to win with), are not scored. Returns how many scorer
    requests failed."""
    scored = [i for i, r in enumerate(records) if r["error"] is None and r["finish_reason"] != "length"]
    conversations = [scored_conversation(rows[i]["prompt"], text, input_format) for i in scored
                     for text in (records[i]["generated"], rows[i]["original_response"], rows[i]["reference_edit"])]
    conversations += [scored_conversation(p["prompt"], side[-1]["content"], input_format)
                      for p in pairs for side in (p["chosen"], p["rejected"])]
    with _progress(len(conversations), f"{prefix} reward model") as bar:
        scores = scorer.score(conversations, bar.update)
    for n, i in enumerate(scored):
        s_gen, s_orig, s_ref = scores[3 * n:3 * n + 3]
        row, metrics = rows[i], records[i]["metrics"]
        metrics.update({f"{prefix}_reward_generated": s_gen, f"{prefix}_reward_original": s_orig,
                        f"{prefix}_reward_reference": s_ref})
        metrics.update(M.reward_wins(records[i]["generated"], row["original_response"], row["reference_edit"],
                                     s_gen, s_orig, s_ref, prefix=f"{prefix}_"))
    pair_scores = scores[3 * len(scored):]
    field = "rm" if prefix == "proxy" else f"{prefix}_rm"
    for record, s_chosen, s_rejected in zip(pair_records, pair_scores[0::2], pair_scores[1::2]):
        if s_chosen is not None and s_rejected is not None:
            record["metrics"].update(M.rm_pair_metrics(record["kind"], s_chosen, s_rejected, field))
    return sum(s is None for s in scores)


def build_report(cfg, model_name, rm_path, records, pair_records, sampling, notes, failures=None,
                 gold_kind=None, provenance: Optional[dict] = None) -> dict:
    """Headline values at the top level; each metric with its CI overall, per domain and per language
    (generation metrics over the edit rows, likelihood metrics over the pairs; the win rates over the
    finished edits, cut_share beside them); meta.provenance: what produced every figure."""
    samples, seed = cfg.eval.bootstrap_samples, cfg.seed
    scored = records + pair_records
    overall = M.summarize_rows(scored, samples, seed)
    headline = {key: (overall[key]["value"] if key in overall else None)
                for key, _, _ in M.GENERATION_METRICS + M.LIKELIHOOD_METRICS}
    reasons = {reason: sum(r["finish_reason"] == reason for r in records) for reason in ("stop", "length", "error")}
    generated = reasons["stop"] + reasons["length"]
    return {
        **headline,
        "cut_share": reasons["length"] / generated if generated else None,
        "meta": {"model": model_name, "reward_model": rm_path, "proxy_reward_model": rm_path,
                 "gold": {"reward_model": cfg.eval.gold_rm, "reward_model_kind": gold_kind or cfg.eval.gold_rm_kind,
                          "reward_model_input": cfg.eval.gold_rm_input, "judge_endpoint": cfg.eval.judge_endpoint,
                          "judge_model": cfg.eval.judge_model},
                 "data_dir": str(cfg.data_dir), "split": cfg.eval.split,
                 "sampling": asdict(sampling), "max_prompt_tokens": cfg.eval.max_prompt_tokens,
                 "bootstrap_samples": samples, "seed": seed, "notes": notes, "provenance": provenance},
        "counts": {"rows": len(records), "pairs": len(pair_records), "finish_reasons": reasons,
                   "errors": sum(r["error"] is not None for r in records),
                   "empty": int(sum(r["metrics"].get("empty", 0) for r in records)),
                   "truncated": int(sum(r["metrics"].get("truncated", 0) for r in records)),
                   "copies": int(sum(r["metrics"].get("copy_exact", 0) for r in records)),
                   "near_copies": int(sum(r["metrics"].get("near_copy", 0) for r in records)),
                   "flagged_too_long": sum(r["flagged_too_long"] for r in records),
                   "prompts_shortened": sum(r["prompt_shortened"] for r in records),
                   # requests that failed after retries; conversations cut by recipes.reward's rule for a scorer
                   **{k if k.endswith("_truncated") else f"{k}_failures": v for k, v in (failures or {}).items()}},
        "overall": overall,
        "by_domain": M.summarize_groups(scored, "domain", samples, seed),
        "by_language": M.summarize_groups(scored, "language", samples, seed),
    }


def write_outputs(out: Path, records: list[dict], pair_records: list[dict], report: dict) -> None:
    from eval.report import plot_copy_rate, plot_length_ratio, plot_metrics, render_markdown

    atomic_write_jsonl(out / "generations.jsonl", records)
    atomic_write_jsonl(out / "likelihood.jsonl", pair_records)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    plot_metrics({report["meta"]["model"]: report}, out / "metrics.png", f"eval: {Path(report['meta']['model']).name}")
    plot_copy_rate(report, out / "copy_rate.png")
    plot_length_ratio([r["metrics"]["length_ratio"] for r in records if "length_ratio" in r["metrics"]],
                      out / "length_ratio.png")
