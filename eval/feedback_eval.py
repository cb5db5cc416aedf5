"""The eval of a Feedback model (recipes/feedback.py) on DATA/feedback/SPLIT.jsonl.

    ./launch.sh eval eval.task=feedback model=PATH_OR_ENDPOINT data=DATA_DIR     (or init=RUN/feedback/final)

One item per (row, response) of the split (with --feedback-targets all the data has several lines per
response; they share their references and are scored once). The model answers the request
data_prep.feedback_prompt.build_feedback_request (the line's messages minus its target); its feedback is
compared with that response's annotator feedback texts (`references`, `levels`):
  format_adherence   it begins "The response is {not|slightly|partially|mostly|perfectly} helpful"
  level_exact        its level equals the annotators' level: the median of their levels on the scale
                     not < slightly < partially < mostly < perfectly (with an even number of
                     annotators, the lower of the two middle levels: our choice)
  level_within_one   its level is at most one step from the annotators' level
  chrf               corpus chrF++ (sacrebleu, word order 2) against all of the response's texts as
                     references (sacrebleu keeps the best-matching reference per item)
A feedback without a valid level counts as a disagreement in both level metrics. Each figure comes
with a 95% percentile-bootstrap CI over items (eval/metrics.py), overall, by domain and by language.

Writes into cfg.out: generations.jsonl, report.json, report.md, summary.json, config.yaml, cache/.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from data_prep.feedback_prompt import HELPFULNESS_LEVELS, helpfulness_level
from recipes.config import to_yaml
from hs3.io import UserError, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl

from eval import metrics as M
from eval.data import check_held_out, manifest_notes, training_record
from eval.engines import GenerationCache, Sampling, generate_cached, is_endpoint
from eval.target import (check_config, claim_out_dir, describe_target, generation_engine, identity, local_dir,
                         model_under_test, target_settings)

METRICS = (("format_adherence", "starts with a valid helpfulness phrase"),
           ("level_exact", "helpfulness level = annotators' (median)"),
           ("level_within_one", "helpfulness level within one step"),
           ("chrf", "chrF++ vs annotator feedback"))


def annotators_level(levels: list[str]) -> Optional[str]:
    """The (lower) median of the annotators' levels on the helpfulness scale; None when there are none."""
    ranks = sorted(HELPFULNESS_LEVELS.index(level) for level in levels if level in HELPFULNESS_LEVELS)
    return HELPFULNESS_LEVELS[ranks[(len(ranks) - 1) // 2]] if ranks else None


def chrf_stats_multi(hypothesis: str, references: list[str]) -> list[int]:
    """chrF++ statistics of one item against several references (sacrebleu keeps the best one)."""
    chrf = M._chrf(2)
    return [int(x) for x in chrf._extract_corpus_statistics([hypothesis], [[r] for r in references])[0]]


def item_metrics(feedback: str, references: list[str], levels: list[str]) -> dict:
    level = helpfulness_level(feedback.strip())
    target = annotators_level(levels)
    distance = (abs(HELPFULNESS_LEVELS.index(level) - HELPFULNESS_LEVELS.index(target))
                if level is not None and target is not None else None)
    return {"level": level, "annotators_level": target,
            "format_adherence": float(level is not None),
            "level_exact": float(distance == 0) if target is not None else None,
            "level_within_one": float(distance is not None and distance <= 1) if target is not None else None,
            "chrf": chrf_stats_multi(feedback, references)}


def load_items(data_dir: str | Path, split: str, max_rows: int = -1) -> list[dict]:
    path = Path(data_dir) / "feedback" / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"data_dir={data_dir}: missing {path} (build the data with prep.subsets including feedback)")
    items, seen = [], set()
    for line in read_jsonl(path):
        key = (line["source"]["row"], line["source"]["response"])
        if key in seen:
            continue
        seen.add(key)
        items.append({"id": f"feedback/{split}/{key[0]}/response{key[1]}", "prompt": line["messages"][:-1],
                      "references": line["references"], "levels": line["levels"],
                      "domain": line.get("domain", "unknown"), "language": line.get("language", "unknown")})
    return items[:max_rows] if max_rows >= 0 else items


def summarize(records: list[dict], keys, samples: int, seed: int) -> dict:
    out = {}
    for key in keys:
        summary = M.summarize((r["metrics"].get(key) for r in records), samples, seed, key if key == "chrf" else None)
        if summary is not None:
            out[key] = summary
    return out


def grouped(records: list[dict], field: str, keys, samples: int, seed: int) -> dict:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record.get(field) or "unknown"), []).append(record)
    return {name: summarize(groups[name], keys, samples, seed) for name in sorted(groups)}


def render(report: dict, labels, title: str, group_fields=("domain", "language")) -> str:
    """report.md: the overall table with CIs, then one table per group field."""
    from eval.report import md_table

    def cell(key, s):
        if not s:
            return "n/a"
        scale = (lambda v: f"{v:.1f}") if key == "chrf" else (lambda v: f"{100 * v:.1f}%")
        return f"{scale(s['value'])} [{scale(s['ci'][0])}, {scale(s['ci'][1])}]"

    lines = [f"# {title}", "", f"model: `{report['meta']['model']}`; data: `{report['meta']['data_dir']}` "
             f"({report['meta']['split']}); {report['counts']['items']} items", ""]
    lines += [md_table(["metric", "value [95% CI]", "n"],
                       [[label, cell(key, report["overall"].get(key)), str((report["overall"].get(key) or {}).get("n", 0))]
                        for key, label in labels]), ""]
    for field in group_fields:
        groups = report.get(f"by_{field}") or {}
        columns = [key for key, _ in labels if any(key in m for m in groups.values())]
        lines += [f"## by {field}", "", md_table([field] + columns,
                                                  [[g] + [cell(k, m.get(k)) for k in columns] for g, m in groups.items()]), ""]
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def finish(cfg, out: Path, records: list[dict], report: dict, markdown: str, metric: str, start: float,
           records_file: str = "generations.jsonl") -> dict:
    """records_file, report.json, report.md, summary.json, then config.yaml (the stage is done)."""
    atomic_write_jsonl(out / records_file, records)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown)
    value = (report["overall"].get(metric) or {}).get("value")
    summary = {"stage": "eval", "task": report["task"], "metric": metric, "value": value, "out": str(out),
               "wall_s": round(time.monotonic() - start, 1)}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))  # last: with summary.json it marks the stage done
    return summary


def dry_run(cfg, task: str) -> dict:
    print(to_yaml(cfg))
    print(f"eval ({task}): dry run, would score {model_under_test(cfg, check=False) or cfg.model.path} on "
          f"{cfg.data_dir} ({'feedback' if task == 'feedback' else 'select'}/{cfg.eval.split}) -> {cfg.out}/report.json")
    return {"stage": "eval", "metric": "dry_run", "value": None, "wall_s": 0.0, "out": str(cfg.out)}


def run(cfg) -> dict:
    check_config(cfg)
    if cfg.dry_run:
        return dry_run(cfg, "feedback")
    start = time.monotonic()
    e, out = cfg.eval, Path(cfg.out)
    target = model_under_test(cfg)
    model_name = target or str(cfg.model.path)
    model_dir = local_dir(cfg, target)
    record = training_record(model_dir)
    check_held_out(record, model_name, [f"feedback/{e.split}"], "model")
    notes = manifest_notes(cfg.data_dir, [(model_name, record)])
    items = load_items(cfg.data_dir, e.split, e.max_rows)
    claim_out_dir(out, identity(cfg, target))
    sampling = Sampling(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, seed=cfg.seed)
    settings = None if target and is_endpoint(target) else target_settings(cfg, model_dir, target)
    engine = generation_engine(cfg, target, settings)
    model = describe_target(cfg, target, engine, settings)
    generations = generate_cached(engine, [i["prompt"] for i in items], sampling,
                                  GenerationCache(out / "cache" / "generations.jsonl"))
    records = []
    for item, generation in zip(items, generations):
        records.append({"id": item["id"], "domain": item["domain"], "language": item["language"],
                        "generated": generation.text, "finish_reason": generation.finish_reason,
                        "error": generation.error,
                        "metrics": {} if generation.error else item_metrics(generation.text, item["references"], item["levels"])})
    failed = sum(r["error"] is not None for r in records)
    if failed:
        notes.append(f"{failed} of {len(records)} items failed after retries: recorded in generations.jsonl, left out")
    keys = [k for k, _ in METRICS]
    report = {"task": "feedback", "meta": {"model": model_name, "data_dir": str(cfg.data_dir), "split": e.split,
                                           "sampling": asdict(sampling),
                                           "bootstrap_samples": e.bootstrap_samples,
                                           "provenance": provenance(cfg, model, [i["id"] for i in items],
                                                                    sampling=asdict(sampling))},
              "counts": {"items": len(records), "errors": failed},
              "overall": summarize(records, keys, e.bootstrap_samples, cfg.seed),
              "by_domain": grouped(records, "domain", keys, e.bootstrap_samples, cfg.seed),
              "by_language": grouped(records, "language", keys, e.bootstrap_samples, cfg.seed),
              "level_confusion": confusion(records), "notes": notes}
    summary = finish(cfg, out, records, report, render(report, METRICS, "Feedback model eval"), "level_exact", start)
    shown = ", ".join(f"{k}={report['overall'][k]['value']:.3g}" for k in keys if k in report["overall"])
    print(f"eval (feedback): {model_name} on {len(records)} items: {shown} -> {out}/report.md")
    return summary


def provenance(cfg, model: dict, ids: list[str], **more) -> dict:
    """meta.provenance of a Feedback or Select report (the edit eval's in eval/run.py): the model under
    test, the data (dir, manifest sha256, split, item ids) and what else scored it."""
    import hashlib

    from hs3.io import sha256_file

    manifest = Path(cfg.data_dir) / "manifest.json"
    data = {"dir": str(cfg.data_dir), "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
            "split": cfg.eval.split, "rows": len(ids),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()}
    return {"model": model, "data": data, "scorers": {}, **more}


def confusion(records: list[dict]) -> dict:
    """Annotators' level -> the model's level (or "none") -> count."""
    table: dict[str, dict[str, int]] = {}
    for r in records:
        m = r["metrics"]
        if m.get("annotators_level"):
            row = table.setdefault(m["annotators_level"], {})
            row[m["level"] or "none"] = row.get(m["level"] or "none", 0) + 1
    return table
