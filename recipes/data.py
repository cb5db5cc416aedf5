"""The pipeline's data stage: `python -m launcher data [key=value ...]` runs data_prep on cfg.prep.

    prep.source      hf, or a directory in the HelpSteer3 layout (relative paths: from the repo root)
    prep.revision    hub revision for prep.source=hf
    prep.feedback_orders, prep.keep_leaked, prep.strict, prep.keep_perfect_feedback   as python -m data_prep's options
    prep.max_seq_len + prep.tokenizer   reject longer train rows, flag longer validation rows; tokenizer null = the model's
    seed             for prep.feedback_orders=K
Output: cfg.out (= data_dir) holds the build, plus config.yaml and summary.json for the pipeline.
"""
from __future__ import annotations

import time
from pathlib import Path

from recipes.config import REPO_ROOT, to_yaml
from hs3.io import atomic_write_json, atomic_write_text


def run(cfg) -> dict:
    from data_prep.build import Options, build, summary_line

    prep = cfg.prep
    source = str(prep.source)
    if source != "hf" and not Path(source).is_absolute():
        source = str(REPO_ROOT / source)
    tokenizer, tokenizer_name = None, prep.tokenizer
    if prep.max_seq_len is not None and not prep.tokenizer:
        from recipes.models import load_tokenizer, resolve_model_path

        tokenizer_name = str(cfg.model.tokenizer or resolve_model_path(cfg.model))
        tokenizer = load_tokenizer(cfg.model)
    options = Options(feedback_orders=str(prep.feedback_orders), seed=cfg.seed, tokenizer=tokenizer_name,
                      max_seq_len=prep.max_seq_len, strict=prep.strict, keep_leaked=prep.keep_leaked,
                      subsets=str(prep.subsets), feedback_targets=str(prep.feedback_targets),
                      feedback_instruction=prep.feedback_instruction,
                      keep_perfect_feedback=prep.keep_perfect_feedback)
    if cfg.dry_run:
        print(f"data: would build {cfg.out} from {source} with {options}")
        return {"stage": "data", "metric": "dry_run", "value": None, "out": str(cfg.out)}

    start = time.monotonic()
    manifest = build(source, cfg.out, revision=str(prep.revision), options=options, tokenizer=tokenizer)
    train_rows = {name.split("/")[0]: file["lines"] for name, file in manifest["outputs"].items()
                  if name.endswith("/train.jsonl")}  # the kinds of the built subsets
    first = next(iter(train_rows))
    summary = {"stage": "data", "metric": f"{first}_train_rows", "value": train_rows[first],
               "wall_s": round(time.monotonic() - start, 3), "out": str(cfg.out),
               **{f"{kind}_train_rows": n for kind, n in train_rows.items() if kind != first},
               "rejected_rows": manifest["outputs"]["rejected.jsonl"]["lines"]}
    atomic_write_text(Path(cfg.out) / "config.yaml", to_yaml(cfg))
    atomic_write_json(Path(cfg.out) / "summary.json", summary)
    print(summary_line(manifest, cfg.out))
    return summary
