"""The eval of a Select model (recipes/select.py) on DATA/select/SPLIT.jsonl.

    ./launch.sh eval eval.task=select model=PATH data=DATA_DIR     (or init=RUN/select/final)

Each pair is scored with recipes.reward.score_conversations (the same input and truncation rule as the
select stage's training and its own accuracy): r(context + chosen) and r(context + rejected). Reported,
each with a 95% percentile-bootstrap CI over pairs (eval/metrics.py):
  accuracy            share of pairs with r(chosen) > r(rejected) (a tie is not a success), overall,
                      by preference strength |overall_preference| (strength_1..3), domain and language
  weighted_accuracy   the same, each pair weighted by its strength (what the scaled-BT loss weighs)
Ties were left out by the data step (reason `tie`). A local checkpoint only (a sequence classifier with
one output), loaded at its own dtype and placed like the other evals' models (over the GPUs when there
are any); pairs over its sequence length (its hs3_training.json's seq_len, else config.json's
max_position_embeddings: eval/target.py) are cut by recipes.reward's rule and counted.

Writes into cfg.out: scores.jsonl (one line per pair), report.json, report.md, summary.json, config.yaml.
"""
from __future__ import annotations

import time
from pathlib import Path

from hs3.io import UserError, read_jsonl

from eval import metrics as M
from eval.data import check_held_out, manifest_notes, training_record
from eval.engines import gpu_device_map, is_endpoint
from eval.feedback_eval import dry_run, finish, grouped, provenance, render, summarize
from eval.target import check_config, claim_out_dir, describe_target, identity, model_settings, model_under_test

METRICS = (("accuracy", "preference accuracy"),)


def load_pairs(data_dir: str | Path, split: str, max_rows: int = -1) -> list[dict]:
    path = Path(data_dir) / "select" / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"data_dir={data_dir}: missing {path} (build the data with prep.subsets including preference)")
    pairs = read_jsonl(path)
    return pairs[:max_rows] if max_rows >= 0 else pairs


def pair_records(pairs: list[dict], chosen: list[float], rejected: list[float]) -> list[dict]:
    records = []
    for pair, good, bad, win in zip(pairs, chosen, rejected, M.pair_accuracy(chosen, rejected)):
        records.append({"id": pair["id"], "weight": pair["weight"], "strength": f"strength_{pair['weight']}",
                        "domain": pair.get("domain", "unknown"), "language": pair.get("language", "unknown"),
                        "score_chosen": good, "score_rejected": bad, "metrics": {"accuracy": win}})
    return records


def weighted_accuracy(records: list[dict], samples: int, seed: int) -> dict | None:
    """sum(w * win) / sum(w) with a bootstrap CI (resampling pairs)."""
    import numpy as np

    if not records:
        return None
    data = np.array([[r["weight"] * r["metrics"]["accuracy"], r["weight"]] for r in records], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data), size=(samples, len(data)))
    sums = data[idx].sum(axis=1)
    figures = sums[:, 0] / sums[:, 1]
    low, high = np.quantile(figures, [0.025, 0.975])
    return {"value": float(data[:, 0].sum() / data[:, 1].sum()), "ci": [float(low), float(high)], "n": len(records)}


def run(cfg) -> dict:
    from transformers import AutoModelForSequenceClassification

    from recipes import reward
    from recipes.models import load_pretrained, load_tokenizer, torch_dtype

    check_config(cfg)
    if cfg.dry_run:
        return dry_run(cfg, "select")
    start = time.monotonic()
    e, out = cfg.eval, Path(cfg.out)
    target = model_under_test(cfg)
    if not target or is_endpoint(target):
        raise UserError(f"eval.task=select scores a local Select checkpoint (model=DIR or init=DIR), got "
                        f"{target or cfg.model.path}")
    record = training_record(target)
    check_held_out(record, target, [f"preference/{e.split}"], "model")
    notes = manifest_notes(cfg.data_dir, [(target, record)])
    pairs = load_pairs(cfg.data_dir, e.split, e.max_rows)
    claim_out_dir(out, identity(cfg, target))
    settings = model_settings(target, e.dtype)
    model = load_pretrained(AutoModelForSequenceClassification, target, dtype=torch_dtype(settings.dtype),
                            device_map=gpu_device_map()).eval()
    tokenizer = load_tokenizer(cfg.model, target)
    max_len = int(settings.seq_len or cfg.train.seq_len)
    chosen = reward.score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], max_len, e.batch_size)
    rejected = reward.score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], max_len, e.batch_size)
    records = pair_records(pairs, chosen, rejected)
    longer = sum(reward.conversation_length(tokenizer, p["prompt"] + side) > max_len
                 for p in pairs for side in (p["chosen"], p["rejected"]))
    if longer:
        notes.append(f"{longer} sides over the model's sequence length {max_len} tokens: cut by recipes.reward's "
                     f"truncation rule")
    samples, keys = e.bootstrap_samples, ["accuracy"]
    overall = summarize(records, keys, samples, cfg.seed)
    if (weighted := weighted_accuracy(records, samples, cfg.seed)) is not None:
        overall["weighted_accuracy"] = weighted
    described = describe_target(cfg, target, None, settings)
    report = {"task": "select", "meta": {"model": target, "data_dir": str(cfg.data_dir), "split": e.split,
                                         "max_len": max_len, "bootstrap_samples": samples,
                                         "provenance": provenance(cfg, described, [p["id"] for p in pairs],
                                                                  max_length=max_len)},
              "counts": {"items": len(records), "sides_truncated": longer},
              "overall": overall,
              "by_strength": grouped(records, "strength", keys, samples, cfg.seed),
              "by_domain": grouped(records, "domain", keys, samples, cfg.seed),
              "by_language": grouped(records, "language", keys, samples, cfg.seed), "notes": notes}
    markdown = render(report, METRICS + (("weighted_accuracy", "accuracy weighted by strength"),), "Select model eval",
                      ("strength", "domain", "language"))
    summary = finish(cfg, out, records, report, markdown, "accuracy", start, "scores.jsonl")
    shown = ", ".join(f"{k}={v['value']:.3g}" for k, v in overall.items())
    print(f"eval (select): {target} on {len(records)} pairs: {shown} -> {out}/report.md")
    return summary
