"""The data step end to end on fixtures written here and on the bundled sample."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_DIR, run_cli
from data_prep.build import Options, build
from hs3.io import UserError, read_jsonl

PREFIX = "Edit the response to the previous prompt based on the following feedback:\n\n"


def edit_row(i: int, **changes) -> dict:
    row = {"domain": "general", "language": "english",
           "context": [{"role": "user", "content": f"Question {i}?"}],
           "original_response": f"Answer {i}.", "edited_response": f"Better answer {i}.",
           "feedback": [f"Item A{i}.", f"Item B{i}.", f"Item C{i}."], "change_summary": f"Improved {i}."}
    row.update(changes)
    return row


def quality_row(i: int, **changes) -> dict:
    row = {"domain": "code", "language": "python",
           "context": [{"role": "user", "content": f"Code question {i}?"}],
           "original_response": f"print({i})", "good_edited_response": f"print({i} + 1)",
           "bad_edited_response": f"print({i} - 1)", "feedback": [f"Wrong {i}."]}
    row.update(changes)
    return row


def write_source(root: Path, splits: dict[str, list], gz: bool = False) -> Path:
    """A HelpSteer3-layout dir; each split is a list of dicts (written as JSON) or raw bytes lines."""
    for name in ("edit/train", "edit/validation", "edit_quality/train", "edit_quality/validation"):
        lines = [r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in splits.get(name, [])]
        data = b"".join(line + b"\n" for line in lines)
        path = root / f"{name}.jsonl{'.gz' if gz else ''}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return root


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "data"
    build(str(SAMPLE_DIR), out, progress=False)
    return out


def test_sft_rows_have_the_exact_layout(tmp_path):
    context = [{"role": "user", "content": "Was ist 2+2?"}, {"role": "assistant", "content": "5"},
               {"role": "user", "content": "Sicher?"}]
    src = write_source(tmp_path / "src", {"edit/train": [edit_row(0, context=context, language="german",
                                                                  feedback=["Falsch.", "However, short."])]})
    build(str(src), tmp_path / "out", options=Options(feedback_orders="given"), progress=False)
    [row] = read_jsonl(tmp_path / "out/sft/train.jsonl")
    assert row == {
        "id": "edit/train/0/0-1",
        "messages": [
            {"role": "user", "content": "Was ist 2+2?"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Sicher?"},
            {"role": "assistant", "content": "Answer 0."},
            {"role": "user", "content": PREFIX + "Falsch.\n\nHowever, short."},
            {"role": "assistant", "content": "Better answer 0."},
        ],
        "domain": "general", "language": "german",
        "source": {"subset": "edit", "split": "train", "row": 0, "feedback_order": [0, 1]},
        "metadata": {"change_summary": "Improved 0."},
    }
    [prompt] = read_jsonl(tmp_path / "out/prompts/train.jsonl")
    assert prompt["prompt"] == row["messages"][:-1]
    assert (prompt["original_response"], prompt["reference_edit"]) == ("Answer 0.", "Better answer 0.")


def test_all_orders_give_every_permutation_once(sample_build):
    rows = read_jsonl(sample_build / "sft/train.jsonl")
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"]["row"], []).append(r)
    three = by_source[1]  # a row with 3 feedback items
    assert len(three) == 6
    requests = [r["messages"][-2]["content"] for r in three]
    assert len(set(requests)) == 6 and len({r["id"] for r in three}) == 6
    assert sorted(tuple(r["source"]["feedback_order"]) for r in three) == sorted(
        [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
    five = by_source[2]  # 5 feedback items: the 3 selected ones, permuted
    assert len(five) == 6 and {tuple(sorted(r["source"]["feedback_order"])) for r in five} == {(2, 3, 4)}
    assert five[0]["source"]["feedback_order"] == [2, 3, 4]  # selection order first
    [empty] = by_source[3]  # no feedback: one conversation that says <None>
    assert empty["messages"][-2]["content"] == PREFIX + "<None>" and empty["id"] == "edit/train/3/none"


def test_k_orders_are_distinct_and_chosen_by_seed(tmp_path):
    src = write_source(tmp_path / "src", {"edit/train": [edit_row(i) for i in range(8)]})
    draws = {}
    for seed in (1, 2):
        build(str(src), tmp_path / f"k{seed}", options=Options(feedback_orders="2", seed=seed), progress=False)
        rows = read_jsonl(tmp_path / f"k{seed}/sft/train.jsonl")
        assert len(rows) == 16
        per_row = {}
        for r in rows:
            per_row.setdefault(r["source"]["row"], set()).add(tuple(r["source"]["feedback_order"]))
        assert all(len(orders) == 2 for orders in per_row.values())
        draws[seed] = per_row
    assert draws[1] != draws[2]


def test_pairs_both_kinds_and_equal_pair_dropped(sample_build):
    pairs = read_jsonl(sample_build / "pairs/train.jsonl")
    kinds = {}
    for p in pairs:
        kinds.setdefault(p["source"]["row"], []).append(p["kind"])
        assert p["chosen"][0]["role"] == "assistant" and p["prompt"][-1]["content"].startswith(PREFIX)
    assert kinds[0] == ["good_vs_bad", "good_vs_original"]
    assert kinds[11] == ["good_vs_original"]  # its good and bad edits differ only in whitespace
    first = pairs[0]
    source = [json.loads(x) for x in (SAMPLE_DIR / "edit_quality/train.jsonl").read_text().splitlines()][0]
    assert first["chosen"] == [{"role": "assistant", "content": source["good_edited_response"]}]
    assert first["rejected"] == [{"role": "assistant", "content": source["bad_edited_response"]}]
    assert pairs[1]["rejected"] == [{"role": "assistant", "content": source["original_response"]}]
    counts = json.loads((sample_build / "manifest.json").read_text())["counts"]["edit_quality/train"]
    assert counts["pairs_not_emitted"] == {"equal_after_whitespace_normalisation": {"good_vs_bad": 1}}


def test_perfectly_helpful_items_are_dropped_by_default_kept_on_request_and_counted(tmp_path):
    perfect = "The response is perfectly helpful."
    rows = [edit_row(0, feedback=[perfect, "It lacks detail.", "However, short."]),
            edit_row(1, feedback=[perfect, "The response is perfectly helpful and concise."]),
            edit_row(2),
            edit_row(3, feedback=["a", "b but", "c", perfect, "d lack"])]  # more than 3: the seed's rule either way
    src = write_source(tmp_path / "src", {"edit/train": rows, "edit_quality/validation": [
        quality_row(0, feedback=[perfect, "Wrong."])]})
    manifest = build(str(src), tmp_path / "paper", progress=False)
    sft = read_jsonl(tmp_path / "paper/sft/train.jsonl")
    by_row = {}
    for r in sft:
        by_row.setdefault(r["source"]["row"], []).append(r)
    assert len(by_row[0]) == 2 and {tuple(r["source"]["feedback_order"]) for r in by_row[0]} == {(1, 2), (2, 1)}
    assert all(perfect not in r["messages"][-2]["content"] for r in sft)
    [none] = by_row[1]  # every item dropped: the seed's <None>, trained once
    assert none["messages"][-2]["content"] == PREFIX + "<None>" and none["id"] == "edit/train/1/none"
    assert len(by_row[2]) == 6 and len(by_row[3]) == 6
    [pair, _] = read_jsonl(tmp_path / "paper/pairs/validation.jsonl")
    assert pair["prompt"][-1]["content"] == PREFIX + "Wrong." and pair["source"]["feedback_order"] == [1]
    counts = manifest["counts"]
    assert counts["edit/train"]["perfect_feedback"] == {"policy": "dropped", "rows_dropped": 2,
                                                        "rows_left_without_feedback": 1}
    assert counts["edit_quality/validation"]["perfect_feedback"]["rows_dropped"] == 1
    assert manifest["options"]["keep_perfect_feedback"] is False

    kept = build(str(src), tmp_path / "kept", options=Options(keep_perfect_feedback=True), progress=False)
    sft = read_jsonl(tmp_path / "kept/sft/train.jsonl")
    assert sum(r["source"]["row"] == 0 for r in sft) == 6 and sum(r["source"]["row"] == 1 for r in sft) == 2
    assert kept["counts"]["edit/train"]["perfect_feedback"] == {"policy": "kept (--keep-perfect-feedback)", "rows_kept": 2}
    assert kept["options"]["keep_perfect_feedback"] is True
    # the CLI flag is the same option
    result = run_cli("-m", "data_prep", "--source", str(src), "--out", str(tmp_path / "cli"), "--keep-perfect-feedback",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli/sft/train.jsonl").read_bytes() == (tmp_path / "kept/sft/train.jsonl").read_bytes()


def test_row_with_no_pair_left_is_rejected(tmp_path):
    same = quality_row(0, good_edited_response="x  = 1", bad_edited_response="x = 1\n", original_response=" x = 1")
    src = write_source(tmp_path / "src", {"edit_quality/train": [same, quality_row(1)]})
    build(str(src), tmp_path / "out", progress=False)
    [rejected] = read_jsonl(tmp_path / "out/rejected.jsonl")
    assert (rejected["row"], rejected["reason"]) == (0, "equal_pairs")
    assert len(read_jsonl(tmp_path / "out/pairs/train.jsonl")) == 2


def test_leaks_are_reported_and_removed_or_kept(tmp_path):
    leak = edit_row(5, edited_response="A different edit.")
    cross = quality_row(1, context=edit_row(9)["context"], original_response=edit_row(9)["original_response"])
    src = write_source(tmp_path / "src", {
        "edit/train": [edit_row(1), leak], "edit/validation": [edit_row(5), edit_row(9)],
        "edit_quality/train": [cross, quality_row(2)], "edit_quality/validation": [quality_row(3)]})
    manifest = build(str(src), tmp_path / "removed", progress=False)
    assert manifest["leakage"]["leaked_rows"] == {"edit/train": 1, "edit_quality/train": 1}
    assert manifest["leakage"]["rows"] == [{"row": "edit/train/1", "matches": ["edit/validation/0"]},
                                           {"row": "edit_quality/train/0", "matches": ["edit/validation/1"]}]
    assert {r["source"]["row"] for r in read_jsonl(tmp_path / "removed/sft/train.jsonl")} == {0}
    assert {r["source"]["row"] for r in read_jsonl(tmp_path / "removed/pairs/train.jsonl")} == {1}
    assert [(r["subset"], r["row"], r["reason"]) for r in read_jsonl(tmp_path / "removed/rejected.jsonl")] == [
        ("edit", 1, "leaked"), ("edit_quality", 0, "leaked")]
    assert len(read_jsonl(tmp_path / "removed/sft/validation.jsonl")) == 12  # validation untouched

    kept = build(str(src), tmp_path / "kept", options=Options(keep_leaked=True), progress=False)
    assert kept["leakage"]["leaked_rows"] == {"edit/train": 1, "edit_quality/train": 1}
    assert {r["source"]["row"] for r in read_jsonl(tmp_path / "kept/sft/train.jsonl")} == {0, 1}
    assert read_jsonl(tmp_path / "kept/rejected.jsonl") == []


BAD_ROWS = [
    (b"\xff\xfe not utf-8", "invalid_utf8"),
    (b'{"domain": "general", "context": [', "malformed_json"),
    (b'{"domain": "x", "language": "y", "context": [{"role": "user", "content": "\\ud800"}]}', "invalid_utf8"),
    (b"[1, 2, 3]", "not_an_object"),
    ({k: v for k, v in edit_row(0).items() if k != "edited_response"}, "missing_field"),
    (edit_row(0, feedback="one string"), "wrong_type"),
    (edit_row(0, domain=3), "wrong_type"),
    (edit_row(0, context=[]), "empty_context"),
    (edit_row(0, context=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]), "context_last_not_user"),
    (edit_row(0, context=[{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"}]), "context_roles_not_alternating"),
    (edit_row(0, context=[{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]), "context_first_not_user"),
    (edit_row(0, context=[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]), "context_bad_role"),
    (edit_row(0, context=[{"role": "user"}]), "missing_field"),
    (edit_row(0, original_response=""), "empty_response"),
    (edit_row(0, edited_response="  \n"), "empty_response"),
    (edit_row(0, feedback=["fine", 3]), "feedback_item_not_string"),
]


def test_every_bad_input_kind_is_rejected_with_its_reason(tmp_path):
    rows = [edit_row(100)] + [bad for bad, _ in BAD_ROWS] + [edit_row(101, extra_field={"kept": True})]
    src = write_source(tmp_path / "src", {"edit/train": rows}, gz=True)
    manifest = build(str(src), tmp_path / "out", progress=False)
    rejected = read_jsonl(tmp_path / "out/rejected.jsonl")
    assert [(r["row"], r["reason"]) for r in rejected] == [(i + 1, reason) for i, (_, reason) in enumerate(BAD_ROWS)]
    assert rejected[0]["record"] == "\\xff\\xfe not utf-8"  # the raw line, as far as it can be shown
    assert rejected[4]["record"]["domain"] == "general"  # parsed records are kept whole
    counts = manifest["counts"]["edit/train"]
    assert (counts["read"], counts["used"], counts["rejected"]) == (len(rows), 2, len(BAD_ROWS))
    sft = read_jsonl(tmp_path / "out/sft/train.jsonl")
    assert {r["source"]["row"] for r in sft} == {0, len(rows) - 1}
    assert sft[-1]["metadata"] == {"change_summary": "Improved 101.", "extra_field": {"kept": True}}


def test_manifest_reconciles_and_lists_outputs(sample_build):
    manifest = json.loads((sample_build / "manifest.json").read_text())
    assert set(manifest["counts"]) == {"edit/train", "edit/validation", "edit_quality/train", "edit_quality/validation"}
    rejected_lines = 0
    for name, c in manifest["counts"].items():
        assert c["read"] == c["used"] + c["rejected"] == c["used"] + sum(c["rejected_by_reason"].values())
        rejected_lines += c["rejected"]
    assert manifest["counts"]["edit/train"]["read"] == 24
    for name, entry in manifest["outputs"].items():
        lines = (sample_build / name).read_text().splitlines()
        assert entry["lines"] == len(lines)
    assert manifest["outputs"]["rejected.jsonl"]["lines"] == rejected_lines == 1
    assert manifest["counts"]["edit/train"]["emitted"]["sft"] == manifest["outputs"]["sft/train.jsonl"]["lines"]
    assert len(manifest["source"]["files"]["edit/train"]["sha256"]) == 64


def test_reruns_are_byte_identical_and_same_out_is_up_to_date(tmp_path, sample_build):
    again = tmp_path / "again"
    build(str(SAMPLE_DIR), again, progress=False)
    assert files(again) == files(sample_build)
    mtimes = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    manifest = build(str(SAMPLE_DIR), again, progress=False)
    assert manifest["up_to_date"] and {p: p.stat().st_mtime_ns for p in again.rglob("*")} == mtimes
    with pytest.raises(UserError, match="different data_prep build \\(options differ\\)"):
        build(str(SAMPLE_DIR), again, options=Options(feedback_orders="given"), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no data_prep build"):
        build(str(SAMPLE_DIR), other, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind


def test_empty_files_are_empty_splits(tmp_path):
    src = write_source(tmp_path / "src", {"edit/train": [edit_row(0)]})
    manifest = build(str(src), tmp_path / "out", progress=False)
    assert manifest["counts"]["edit_quality/validation"]["read"] == 0
    assert (tmp_path / "out/pairs/validation.jsonl").read_bytes() == b""


def test_strict_fails_on_any_rejected_row_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match="--strict: 1 of 97 rows rejected \\(leaked 1\\)"):
        build(str(SAMPLE_DIR), tmp_path / "out", options=Options(strict=True), progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    build(str(SAMPLE_DIR), tmp_path / "kept", options=Options(strict=True, keep_leaked=True), progress=False)
    assert (tmp_path / "kept/manifest.json").is_file()


def test_max_seq_len_counts_like_apply_chat_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = build(str(SAMPLE_DIR), tmp_path / "full", options=Options(tokenizer=str(tiny_model_dir)), progress=False)
    conversations = read_jsonl(tmp_path / "full/sft/train.jsonl")
    plain = {c["id"]: len(tokenizer.apply_chat_template(c["messages"], tokenize=True, return_dict=False))
             for c in conversations}
    from data_prep.tokens import TokenCounter

    counter = TokenCounter(tokenizer)  # piecewise counting must reproduce apply_chat_template exactly
    assert counter.count([c["messages"] for c in conversations]) == list(plain.values())
    assert counter.shortcut
    lengths = full["token_lengths"]["sft/train"]
    assert (lengths["count"], lengths["max"], lengths["min"]) == (len(plain), max(plain.values()), min(plain.values()))

    limit = sorted(plain.values())[len(plain) // 2]
    longest_per_row = {}
    for c in conversations:
        key = c["source"]["row"]
        longest_per_row[key] = max(longest_per_row.get(key, 0), plain[c["id"]])
    cut = build(str(SAMPLE_DIR), tmp_path / "cut", options=Options(tokenizer=str(tiny_model_dir), max_seq_len=limit),
                progress=False)
    too_long = {r["row"] for r in read_jsonl(tmp_path / "cut/rejected.jsonl")
                if r["subset"] == "edit" and r["split"] == "train" and r["reason"] == "too_long"}
    assert too_long and too_long == {row for row, n in longest_per_row.items() if n > limit}
    assert cut["token_lengths"]["sft/train"]["max"] <= limit
    assert cut["counts"]["edit/train"]["rejected_by_reason"]["too_long"] == len(too_long)


def test_pipeline_data_stage_writes_summary_and_is_rerunnable(tmp_path):
    from recipes.config import compose
    from recipes.data import run
    from launcher.stages import is_finished

    cfg = compose("data", [f"run_dir={tmp_path}", "prep.source=data_prep/sample", "prep.feedback_orders=given"])
    summary = run(cfg)
    assert summary["metric"] == "sft_train_rows" and summary["value"] == 23
    assert is_finished(cfg)
    assert run(cfg)["value"] == 23  # the same build into the same dir: up to date, not an error
    assert json.loads((tmp_path / "data/manifest.json").read_text())["options"]["keep_perfect_feedback"] is False
    kept = compose("data", [f"run_dir={tmp_path}/kept", "prep.source=data_prep/sample", "prep.keep_perfect_feedback=true"])
    run(kept)
    manifest = json.loads((tmp_path / "kept/data/manifest.json").read_text())
    assert manifest["options"]["keep_perfect_feedback"] is True
    assert manifest["counts"]["edit/validation"]["perfect_feedback"]["rows_kept"] == 4


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_errors_are_one_line(tmp_path):
    assert "no such directory" in _one_line_error(run_cli("-m", "data_prep", "--source", str(tmp_path / "nope"),
                                                          "--out", str(tmp_path / "o")))
    (tmp_path / "flat").mkdir()
    assert "edit/train.jsonl.gz (or .jsonl) not found" in _one_line_error(
        run_cli("-m", "data_prep", "--source", str(tmp_path / "flat"), "--out", str(tmp_path / "o")))
    assert "--feedback-orders many" in _one_line_error(
        run_cli("-m", "data_prep", "--source", str(SAMPLE_DIR), "--out", str(tmp_path / "o"), "--feedback-orders", "many"))
    assert "--strict" in _one_line_error(
        run_cli("-m", "data_prep", "--source", str(SAMPLE_DIR), "--out", str(tmp_path / "o"), "--strict", "--no-progress"))
    assert not (tmp_path / "o").exists()


def test_cli_hub_unreachable_suggests_a_local_dir(tmp_path):
    result = run_cli("-m", "data_prep", "--source", "hf", "--out", str(tmp_path / "o"),
                     env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                          "HF_DATASETS_CACHE": str(tmp_path / "hf/datasets")})
    assert "--source DIR" in _one_line_error(result)


def test_cli_success_prints_one_summary_line(tmp_path):
    result = run_cli("-m", "data_prep", "--source", str(SAMPLE_DIR), "--out", str(tmp_path / "o"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert result.stdout.startswith("data_prep: 97 rows read, 96 used, 1 rejected (leaked 1); sft 133+166, pairs 31+16")
