"""dpo on the HF engine with LoRA: trains against the adapter-disabled reference; final/ is the merged model."""
from __future__ import annotations

import json

import torch

from recipes import dpo
from recipes.config import compose
from hs3.io import sha256_file


def test_lora_dpo_writes_a_merged_plain_model(edit_data_dir, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = compose("dpo", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                          "train.max_steps=3", "train.lr=1e-2", "peft.enabled=true", "peft.r=4"])
    summary = dpo.run(cfg)

    assert summary["metric"] == "reward_accuracy" and 0.0 <= summary["value"] <= 1.0
    out = tmp_path / "dpo"
    assert (out / "adapter" / "adapter_config.json").is_file()
    final = out / "final"
    assert not (final / "adapter_config.json").exists()  # merged: transformers loads it without peft
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = {name for (name, a), (_, b) in zip(merged.named_parameters(), base.named_parameters())
               if not torch.equal(a, b)}
    assert changed and all(any(m in name for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj")) for name in changed), changed
    record = json.loads((final / "hs3_training.json").read_text())
    assert {k: record[k] for k in ("stage", "trained_on", "init", "data_manifest_sha256")} == {
        "stage": "dpo", "trained_on": ["edit_quality/train"], "init": str(tiny_model_dir),
        "data_manifest_sha256": sha256_file(edit_data_dir / "manifest.json")}
    # its inputs, with content fingerprints (recipes/provenance.py): the KL reference is the initial model
    from recipes.provenance import model_fingerprint

    assert record["inputs"]["reference"]["path"] == str(tiny_model_dir)
    assert record["inputs"]["reference"]["fingerprint"] == model_fingerprint(tiny_model_dir)


def test_dpo_skips_and_counts_pairs_over_seq_len(edit_data_dir, tmp_path, tiny_model_dir):
    """A pair whose prompt + chosen or prompt + rejected is over train.seq_len is skipped and counted;
    none is cut (before, DPOTrainer kept the start: trl/trainer/dpo_trainer.py:141-160, keep_start)."""
    from recipes import training
    from hs3.io import read_jsonl

    pairs = read_jsonl(edit_data_dir / "pairs" / "train.jsonl")
    tokenizer = training.load_tokenizer(compose("dpo", [f"run_dir={tmp_path}", f"init={tiny_model_dir}"]))
    n = lambda conv: len(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False))  # noqa: E731
    lengths = [max(n(p["prompt"] + p["chosen"]), n(p["prompt"] + p["rejected"])) for p in pairs]
    seq_len = sorted(lengths)[len(lengths) // 2]
    over = sum(length > seq_len for length in lengths)
    assert 0 < over < len(pairs)
    cfg = compose("dpo", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                          f"train.seq_len={seq_len}"])
    trainer = dpo.build_trainer(cfg)
    assert trainer.skipped_too_long["train"] == over and len(trainer.train_dataset) == len(pairs) - over
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for row in trainer.train_dataset:
        for side in ("chosen_ids", "rejected_ids"):
            assert len(row["prompt_ids"]) + len(row[side]) <= seq_len and row[side][-1] == eot
