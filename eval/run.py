"""The eval stage: score one edit model on the held-out splits.

    ./launch.sh eval model=PATH_OR_ENDPOINT data=DATA_DIR [rm=PATH|null] [eval.max_rows=N] ...

Which model is scored: `model=` when it names a checkpoint directory or an http(s) endpoint;
otherwise `init` (the pipeline's ${run_dir}/rl/final, from conf/stage/eval.yaml); with init=null,
the configured model itself (a hub id, builtin:tiny, pkg:...).

Writes into cfg.out: generations.jsonl (one line per edit/SPLIT row, with its generation and
metrics), likelihood.jsonl (one line per edit_quality pair, with its scores), report.json, report.md, metrics.png, copy_rate.png, length_ratio.png, summary.json,
config.yaml, and cache/ (generations so far: a rerun after a crash resumes from it).
"""
from __future__ import annotations

import gc
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from recipes.config import to_yaml
from recipes.io import UserError, atomic_write_json, atomic_write_jsonl, atomic_write_text

from eval import metrics as M
from eval.data import check_held_out, load_edit_rows, load_pairs, manifest_notes, training_record
from eval.engines import GenerationCache, HFEngine, HTTPEngine, Sampling, generate_cached, is_endpoint


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


def free_memory() -> None:
    """Release a model before the next one loads (on GPUs too: the policy and the rm may both be 70B)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True, leave=False)


def run(cfg) -> dict:
    start = time.monotonic()
    e = cfg.eval
    out = Path(cfg.out)
    if cfg.dry_run:  # print what would run; load and check nothing
        print(to_yaml(cfg))
        print(f"eval: dry run, would score {model_under_test(cfg, check=False) or cfg.model.path} on "
              f"{cfg.data_dir} ({e.split}; reward model: {cfg.reward_model}) -> {out}/report.json")
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
    notes += manifest_notes(cfg.data_dir, [(model_name, model_record)] + ([(rm_path, rm_record)] if rm_path else []))
    for note in notes:
        print(note)

    rows = load_edit_rows(cfg.data_dir, e.split, e.max_rows)
    pairs = load_pairs(cfg.data_dir, e.split, e.max_rows)
    sampling = Sampling(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, seed=cfg.seed)

    # 1. Generate an edit for every row (cached on disk as it goes).
    if target and is_endpoint(target):
        engine = HTTPEngine(target, e.api_model, e.concurrency, e.max_retries, e.request_timeout_s, e.api_key_env)
    else:
        engine = HFEngine.load(cfg.model, target, e.batch_size)
    cache = GenerationCache(out / "cache" / "generations.jsonl")
    with _progress(len(rows), "generating edits") as bar:
        generations = generate_cached(engine, [r["prompt"] for r in rows], sampling, cache, progress=bar.update)
    records = []
    for row, generation in zip(rows, generations):
        original = row["original_response"]
        records.append({
            "id": row["id"], "domain": row["domain"], "language": row["language"],
            "generated": generation.text, "finish_reason": generation.finish_reason,
            "completion_tokens": generation.completion_tokens,
            "metrics": M.row_metrics(generation.text, original, row["reference_edit"], generation.finish_reason,
                                     e.near_copy_chrf),
        })

    # 2. The policy's preference between good and bad edits (needs the model's logits).
    pair_records = [{"id": p["id"], "kind": p["kind"], "domain": p.get("domain", "unknown"),
                     "language": p.get("language", "unknown"), "metrics": {}} for p in pairs]
    if e.policy_likelihood and isinstance(engine, HFEngine):
        policy_preference(engine, pairs, pair_records, cfg)
    elif isinstance(engine, HTTPEngine):
        notes.append("policy log-likelihood preference skipped: an endpoint gives no prompt log-probabilities")
    del engine
    free_memory()

    # 3. Reward model: generated edit vs original and vs human edit; accuracy on the pairs.
    if rm_path:
        reward_model_metrics(rm_path, cfg, rows, records, pairs, pair_records)
        free_memory()

    # 4. Optional LLM judge against the human edit, both orders.
    if e.judge_endpoint:
        from eval.judge import judge_against_reference

        verdicts = judge_against_reference(rows, records, e, cfg.seed, out / "cache" / "judge.jsonl")
        for record, verdict in zip(records, verdicts):
            record["metrics"]["judge_win"] = verdict

    report = build_report(cfg, model_name, rm_path, records, pair_records, sampling, notes)
    write_outputs(out, records, pair_records, report)
    metric = "reward_win_rate" if report.get("reward_win_rate") is not None else "copy_rate"
    summary = {"stage": "eval", "metric": metric, "value": report[metric], "out": str(out),
               "wall_s": round(time.monotonic() - start, 1)}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))  # last: with summary.json it marks the stage done
    headline = ", ".join(f"{k}={report[k]:.3g}" for k in ("copy_rate", "reward_win_rate", "chrf", "rouge_l", "rm_accuracy")
                         if report.get(k) is not None)
    print(f"eval: {model_name} on {len(rows)} rows + {len(pairs)} pairs: {headline} -> {out}/report.md")
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


def reward_model_metrics(rm_path: str, cfg, rows: list[dict], records: list[dict], pairs: list[dict],
                         pair_records: list[dict]) -> None:
    """Scores each row's generated, original and human edit, and each pair's two sides; the
    wins and accuracies go into the records' metrics."""
    from eval.scoring import RewardScorer

    scorer = RewardScorer(rm_path, cfg.model.dtype, cfg.eval.batch_size, cfg.train.seq_len)
    triples = [(r["generated"], row["original_response"], row["reference_edit"]) for r, row in zip(records, rows)]
    conversations = [[*row["prompt"], {"role": "assistant", "content": text}]
                     for row, triple in zip(rows, triples) for text in triple]
    conversations += [[*p["prompt"], *side] for p in pairs for side in (p["chosen"], p["rejected"])]
    with _progress(len(conversations), "reward model") as bar:
        scores = scorer.score(conversations, bar.update)
    for i, (record, (generated, original, reference)) in enumerate(zip(records, triples)):
        s_gen, s_orig, s_ref = scores[3 * i:3 * i + 3]
        record["metrics"].update({"reward_generated": s_gen, "reward_original": s_orig, "reward_reference": s_ref})
        record["metrics"].update(M.reward_wins(generated, original, reference, s_gen, s_orig, s_ref))
    pair_scores = scores[3 * len(triples):]
    for record, s_chosen, s_rejected in zip(pair_records, pair_scores[0::2], pair_scores[1::2]):
        record["metrics"].update(M.rm_pair_metrics(record["kind"], s_chosen, s_rejected))


def build_report(cfg, model_name, rm_path, records, pair_records, sampling, notes) -> dict:
    """Headline values at the top level; each metric with its CI overall, per domain and per language
    (generation metrics over the edit rows, likelihood metrics over the pairs)."""
    samples, seed = cfg.eval.bootstrap_samples, cfg.seed
    scored = records + pair_records
    overall = M.summarize_rows(scored, samples, seed)
    headline = {key: (overall[key]["value"] if key in overall else None)
                for key, _, _ in M.GENERATION_METRICS + M.LIKELIHOOD_METRICS}
    return {
        **headline,
        "meta": {"model": model_name, "reward_model": rm_path, "data_dir": str(cfg.data_dir), "split": cfg.eval.split,
                 "sampling": asdict(sampling), "bootstrap_samples": samples, "seed": seed, "notes": notes},
        "counts": {"rows": len(records), "pairs": len(pair_records),
                   "empty": int(sum(r["metrics"]["empty"] for r in records)),
                   "truncated": int(sum(r["metrics"]["truncated"] for r in records)),
                   "copies": int(sum(r["metrics"]["copy_exact"] for r in records)),
                   "near_copies": int(sum(r["metrics"]["near_copy"] for r in records))},
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
    plot_length_ratio([r["metrics"]["length_ratio"] for r in records], out / "length_ratio.png")
