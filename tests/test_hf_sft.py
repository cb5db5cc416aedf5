"""sft on the HF engine: the loss mask, packing without attention across rows, and ZeRO-3 on 2 processes."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from recipes import sft
from recipes.config import compose
from hs3.io import read_jsonl


def sft_cfg(tmp_path, data_dir, *args):
    return compose("sft", [f"run_dir={tmp_path}", f"data={data_dir}", *args])


def test_labels_cover_only_the_final_assistant_turn(edit_data_dir, tmp_path):
    trainer = sft.build_trainer(sft_cfg(tmp_path, edit_data_dir))
    tokenizer = trainer.processing_class
    row_index = 1  # a multi-turn context: user, assistant, user, original response, edit request, edit
    messages = read_jsonl(edit_data_dir / "sft" / "train.jsonl")[row_index]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]

    batch = trainer.data_collator([trainer.train_dataset[row_index]])
    input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()

    def ids(conversation, **kwargs):
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_len = len(ids(messages[:-1], add_generation_prompt=True))
    assert input_ids == ids(messages)
    assert labels[:prompt_len] == [-100] * prompt_len  # context, earlier assistant turn, original, request
    assert labels[prompt_len:] == input_ids[prompt_len:]
    assert tokenizer.decode(labels[prompt_len:]) == messages[-1]["content"] + "<|eot_id|>"


def test_packed_rows_do_not_attend_to_each_other(edit_data_dir, tmp_path):
    trainer = sft.build_trainer(sft_cfg(tmp_path, edit_data_dir, "train.packing=true", "train.micro_batch=2"))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch  # padding-free: one row of packed sequences, positions restart
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    assert len(starts) >= 3, "expected at least two packed sequences"
    assert (batch["labels"][0][starts[1]] == -100).item()  # no loss across the boundary either

    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        begin, end = starts[1], starts[2]
        alone = model(input_ids=batch["input_ids"][:, begin:end]).logits
    torch.testing.assert_close(packed[:, begin:end], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_two_process_zero3_sft(edit_data_dir, tmp_path, tiny_model_dir):
    """accelerate MULTI_CPU + DeepSpeed ZeRO-3 on 2 CPU processes: trains, shards, saves a full final/."""
    from transformers import AutoModelForCausalLM

    proc = run_cli("-m", "launcher", "sft", f"run_dir={tmp_path}", f"data={edit_data_dir}", "train.max_steps=2",
                   "train.save_steps=2", "hf.num_processes=2", "hf.accelerate_config=conf/accelerate/zero3_cpu.yaml",
                   timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "sft"
    shards = sorted(p.name for p in (out / "checkpoint-2").glob("global_step2/*model_states.pt"))
    assert len(shards) == 2, shards  # one ZeRO partition per process
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["steps"] == 2
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, p_trained), (_, p_start) in zip(trained.named_parameters(), start.named_parameters()):
        assert p_trained.shape == p_start.shape, name  # gathered, not a shard
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))


def test_no_usable_validation_row_is_one_line_naming_the_key(tmp_path):
    """Every validation row over train.seq_len: one line naming the key (TRL raised a bare StopIteration)."""
    from tests.conftest import write_edit_data

    data = write_edit_data(tmp_path / "data", n_train=4, n_validation=2)
    rows = read_jsonl(data / "sft/validation.jsonl")
    for row in rows:
        row["messages"][-1]["content"] = "a much longer edit " * 200
    (data / "sft/validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("-m", "launcher", "sft", f"run_dir={tmp_path / 'run'}", f"data={data}", "train.seq_len=256",
                   "train.max_steps=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "sft/validation.jsonl: no usable row (2 longer than train.seq_len=256)" in line
