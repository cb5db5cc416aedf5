"""feedback on the HF engine: sft's trainer on feedback/ (loss on the feedback text only)."""
from __future__ import annotations

import json

from data_prep.build import Options, build
from data_prep.feedback_prompt import helpfulness_level
from recipes import feedback
from recipes.config import compose
from hs3.io import read_jsonl
from tests.conftest import SAMPLE_DIR


def test_feedback_stage_trains_on_feedback_texts(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    build(str(SAMPLE_DIR), data, options=Options(subsets="feedback"), progress=False)
    cfg = compose("feedback", [f"run_dir={tmp_path}", f"data={data}", f"init={tiny_model_dir}", "train.max_steps=2"])
    trainer = feedback.build_trainer(cfg)
    # The tokens SFTTrainer trains on are exactly one annotator's feedback text (+ end of turn).
    line = read_jsonl(data / "feedback" / "train.jsonl")[0]
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trained = [t for t in batch["labels"][0].tolist() if t != -100]
    assert trainer.processing_class.decode(trained) == line["messages"][-1]["content"] + "<|eot_id|>"
    assert helpfulness_level(line["messages"][-1]["content"]) is not None
    assert len(trainer.train_dataset) == 16  # 8 rows x 2 responses (--feedback-targets one)

    summary = feedback.run(cfg)
    assert summary["stage"] == "feedback" and summary["metric"] == "eval_loss" and summary["value"] > 0
    record = json.loads((tmp_path / "feedback" / "final" / "hs3_training.json").read_text())
    assert record["stage"] == "feedback" and record["trained_on"] == ["feedback/train"]
