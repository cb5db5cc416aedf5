"""The eval stage: score one edit model on the held-out splits.

    ./launch.sh eval model=PATH_OR_ENDPOINT data=DATA_DIR [rm=PATH|null] [eval.max_rows=N] ...

Which model is scored: `model=` when it names a checkpoint directory or an http(s) endpoint;
otherwise `init` (the pipeline's ${run_dir}/rl/final, from conf/stage/eval.yaml); with init=null,
the configured model itself (a hub id, builtin:tiny, pkg:...).

Scorers: the training reward model (rm=, the proxy the policy was optimised against: proxy_* keys,
"training RM (optimised against)" in report.md), and the gold scorers, independent of training:
eval.gold_rm (a reward model of either kind, local or an endpoint: eval/reward_scorers.py) and the LLM
judge (eval.judge_endpoint: eval/judge.py). Their win rates are the gold_* keys.

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
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from recipes.config import to_yaml
from hs3.io import UserError, atomic_write_json, atomic_write_jsonl, atomic_write_text

from eval import metrics as M
from eval.data import check_held_out, load_edit_rows, load_pairs, manifest_notes, training_record
from eval.engines import GenerationCache, HFEngine, HTTPEngine, Sampling, generate_cached, is_endpoint
from eval.prompts import shorten_messages
from eval.reward_scorers import TINY_GOLD, load_scorer

# Summary metric of the stage: the first of these the report has (gold before anything the policy saw).
SUMMARY_METRICS = ("gold_reward_win_rate", "gold_judge_win_rate", "copy_rate")
HEADLINE = ("copy_rate", "gold_reward_win_rate", "gold_reward_win_rate_vs_reference", "gold_judge_win_rate",
            "gold_judge_win_rate_vs_reference", "chrf", "rouge_l", "proxy_reward_win_rate",
            "proxy_reward_win_rate_vs_reference", "gold_rm_accuracy", "rm_accuracy")


def generation_engine(cfg, target: Optional[str]):
    """The engine that generates with the model under test: an endpoint over HTTP, else in process
    (target None: cfg.model itself)."""
    e = cfg.eval
    if target and is_endpoint(target):
        return HTTPEngine(target, e.api_model, e.concurrency, e.max_retries, e.request_timeout_s, e.api_key_env)
    return HFEngine.load(cfg.model, target, e.batch_size)


def model_under_test(cfg, check: bool = True) -> Optional[str]:
    """A checkpoint dir or endpoint to score, or None for the configured model (see the docstring)."""
    path = str(cfg.model.path)
    if is_endpoint(path) or Path(path).is_dir():
        return path
    if cfg.init:
        if check and not (is_endpoint(str(cfg.init)) or Path(cfg.init).is_dir()):
            raise UserError(f"init={cfg.init}: no such checkpoint (score a model with model=PATH_OR_ENDPOINT, "
                            f"or init=null to score model.path={path})")
        return str(cfg.init)
    return None


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


def check_gold(gold: Optional[str], rm_path: Optional[str], splits: list[str]) -> None:
    """The gold reward model must not be the training one (the policy was optimised against that) and
    must not have been trained on the splits it scores."""
    if not gold or is_endpoint(str(gold)) or not Path(gold).is_dir():
        return  # endpoints and builtin:tiny-gold: nothing to compare; a missing dir fails at loading
    if rm_path and Path(gold).resolve() == Path(rm_path).resolve():
        raise UserError(f"eval.gold_rm={gold} is the training reward model (rm=): the policy was optimised against "
                        f"it, so it cannot be the gold scorer (name an independent one, or leave eval.gold_rm unset)")
    check_held_out(training_record(str(gold)), str(gold), splits, "gold reward model")


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
    from eval.feedback_eval import eval_task

    task = eval_task(cfg)  # a Feedback or Select model has its own eval (eval.task; auto: its training record)
    if task in ("feedback", "select"):
        from importlib import import_module

        return import_module(f"eval.{task}_eval").run(cfg)
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
    if not Path(cfg.data_dir).is_dir():
        raise UserError(f"data_dir={cfg.data_dir}: no such directory (pass data=DIR, a data_prep output dir)")

    # Held-out hygiene: nothing is scored on a split its model was trained on.
    splits = [f"edit/{e.split}", f"edit_quality/{e.split}"]
    model_record = training_record(target if target and not is_endpoint(target) else None)
    rm_record = training_record(rm_path)
    check_held_out(model_record, model_name, splits, "model")
    check_held_out(rm_record, str(rm_path), splits, "reward model")
    check_gold(e.gold_rm, rm_path, splits)
    notes += manifest_notes(cfg.data_dir, [(model_name, model_record)] + ([(rm_path, rm_record)] if rm_path else []))
    for note in notes:
        print(note)

    rows = load_edit_rows(cfg.data_dir, e.split, e.max_rows)
    pairs = load_pairs(cfg.data_dir, e.split, e.max_rows)
    sampling = Sampling(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, seed=cfg.seed)

    # 1. Generate an edit for every row (cached on disk as it goes).
    engine = generation_engine(cfg, target)
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

    # 2. The policy's preference between good and bad edits (needs the model's logits).
    pair_records = [{"id": p["id"], "kind": p["kind"], "domain": p.get("domain", "unknown"),
                     "language": p.get("language", "unknown"), "metrics": {}} for p in pairs]
    if e.policy_likelihood and isinstance(engine, HFEngine):
        policy_preference(engine, pairs, pair_records, cfg)
    elif isinstance(engine, HTTPEngine):
        notes.append("policy log-likelihood preference skipped: an endpoint gives no prompt log-probabilities")
    del engine
    free_memory()

    # 3. Reward models: generated edit vs original and vs human edit; accuracy on the pairs. The
    #    training rm is the proxy (the policy was optimised against it); the gold rm is independent.
    failures = {"proxy_scorer": 0, "gold_scorer": 0, "judge": 0}
    gold_kind = None
    if rm_path:
        proxy = proxy_scorer(rm_path, cfg)
        failures["proxy_scorer"] = reward_model_metrics(proxy, "proxy", "edit_request", rows, records, pairs,
                                                        pair_records)
        failures["proxy_scorer_truncated"] = proxy.shortened
        del proxy
        free_memory()
    if e.gold_rm:
        gold = load_scorer(e.gold_rm, e.gold_rm_kind, dtype=cfg.model.dtype, batch_size=e.batch_size,
                           concurrency=e.concurrency, max_retries=e.max_retries, timeout_s=e.request_timeout_s,
                           api_key_env=e.api_key_env)
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

        wins, failures["judge"] = judge_edits(rows, records, e, cfg.seed, out / "cache" / "judge.jsonl")
        for record, row_wins in zip(records, wins):
            record["metrics"].update(row_wins)

    report = build_report(cfg, model_name, rm_path, records, pair_records, sampling, notes, failures, gold_kind)
    write_outputs(out, records, pair_records, report)
    metric = next((k for k in SUMMARY_METRICS if report.get(k) is not None), "copy_rate")
    summary = {"stage": "eval", "metric": metric, "value": report[metric], "out": str(out),
               "wall_s": round(time.monotonic() - start, 1)}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))  # last: with summary.json it marks the stage done
    headline = ", ".join(f"{k}={report[k]:.3g}" for k in HEADLINE if report.get(k) is not None)
    errors = f", {report['counts']['errors']} rows failed" if report["counts"]["errors"] else ""
    print(f"eval: {model_name} on {len(rows)} rows + {len(pairs)} pairs{errors}: {headline} -> {out}/report.md")
    return summary


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


def proxy_scorer(rm_path: str, cfg):
    """The training reward model, scoring exactly as rm training and the RL reward do (edit prompt +
    edit, recipes.reward.score_conversations with its truncation rule at train.seq_len)."""
    return load_scorer(rm_path, "seqcls", dtype=cfg.model.dtype, batch_size=cfg.eval.batch_size,
                       max_length=cfg.train.seq_len)


def scored_conversation(prompt: list[dict], text: str, input_format: str) -> list[dict]:
    """What a reward model reads: the whole edit prompt + the edit (edit_request, like the training rm),
    or the context turns + the edit as the assistant's response (context: Select/Reward's format)."""
    turns = prompt if input_format == "edit_request" else prompt[:-2]
    return [*turns, {"role": "assistant", "content": text}]


def reward_model_metrics(scorer, prefix: str, input_format: str, rows: list[dict], records: list[dict],
                         pairs: list[dict], pair_records: list[dict]) -> int:
    """Scores each row's generated, original and human edit, and each pair's two sides; the wins
    (`{prefix}_win_vs_*`) and accuracies go into the records' metrics. Rows whose generation failed are
    not scored. Returns how many scorer requests failed."""
    scored = [i for i, r in enumerate(records) if r["error"] is None]
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
                 gold_kind=None) -> dict:
    """Headline values at the top level; each metric with its CI overall, per domain and per language
    (generation metrics over the edit rows, likelihood metrics over the pairs)."""
    samples, seed = cfg.eval.bootstrap_samples, cfg.seed
    scored = records + pair_records
    overall = M.summarize_rows(scored, samples, seed)
    headline = {key: (overall[key]["value"] if key in overall else None)
                for key, _, _ in M.GENERATION_METRICS + M.LIKELIHOOD_METRICS}
    return {
        **headline,
        "meta": {"model": model_name, "reward_model": rm_path, "proxy_reward_model": rm_path,
                 "gold": {"reward_model": cfg.eval.gold_rm, "reward_model_kind": gold_kind or cfg.eval.gold_rm_kind,
                          "reward_model_input": cfg.eval.gold_rm_input, "judge_endpoint": cfg.eval.judge_endpoint,
                          "judge_model": cfg.eval.judge_model},
                 "data_dir": str(cfg.data_dir), "split": cfg.eval.split,
                 "sampling": asdict(sampling), "max_prompt_tokens": cfg.eval.max_prompt_tokens,
                 "bootstrap_samples": samples, "seed": seed, "notes": notes},
        "counts": {"rows": len(records), "pairs": len(pair_records),
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
