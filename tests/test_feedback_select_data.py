"""The data step's feedback and preference subsets (data_prep/feedback_data.py, select_data.py):
Feedback SFT lines, Select pairs with their weight, ties rejected and counted, the cross-subset leak rule."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from data_prep.build import Options, build
from data_prep.feedback_prompt import FEEDBACK_INSTRUCTION, build_feedback_request
from hs3.io import UserError, read_jsonl
from tests.conftest import SAMPLE_DIR, run_cli

ALL = "edit,edit_quality,feedback,preference"


def fb_row(i: int, **changes) -> dict:
    row = {"domain": "general", "language": "english", "context": [{"role": "user", "content": f"Q{i}?"}],
           "response1": f"Good answer {i}.", "response2": f"Bad answer {i}.",
           "feedback1": [f"The response is perfectly helpful. A{i}.", f"The response is mostly helpful. B{i}.",
                         f"The response is partially helpful. C{i}."],
           "feedback2": [f"The response is not helpful. D{i}."]}
    row.update(changes)
    return row


def pref_row(i: int, preference: int, **changes) -> dict:
    row = {"domain": "code", "language": "python", "context": [{"role": "user", "content": f"Code {i}?"}],
           "response1": f"print({i})", "response2": f"print({i} + 1)", "overall_preference": preference,
           "individual_preference": [{"score": preference, "reasoning": "r"}]}
    row.update(changes)
    return row


def write_source(root: Path, splits: dict[str, list]) -> Path:
    for subset in ("edit", "edit_quality", "feedback", "preference"):
        for split in ("train", "validation"):
            path = root / subset / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in splits.get(f"{subset}/{split}", [])))
    return root


@pytest.fixture(scope="module")
def sample_all(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("all") / "data"
    build(str(SAMPLE_DIR), out, options=Options(subsets=ALL), progress=False)
    return out


def test_feedback_lines_are_request_plus_one_annotator_text(sample_all):
    source = dict(enumerate(json.loads(line) for line in
                            (SAMPLE_DIR / "feedback" / "validation.jsonl").read_text().splitlines()))
    lines = read_jsonl(sample_all / "feedback" / "validation.jsonl")
    assert len(lines) == 2 * len(source)  # `one`: a demonstration per response
    for line in lines:
        record = source[line["source"]["row"]]
        r = line["source"]["response"]
        items = record[f"feedback{r}"]
        assert line["messages"][:-1] == build_feedback_request(record["context"], record[f"response{r}"])
        assert line["messages"][-2]["content"] == FEEDBACK_INSTRUCTION
        assert line["messages"][-1] == {"role": "assistant", "content": items[line["source"]["feedback_item"]]}
        assert line["references"] == items


def test_feedback_targets_one_is_seeded_all_takes_every_text(tmp_path):
    rows = [fb_row(i) for i in range(12)]
    src = write_source(tmp_path / "src", {"feedback/train": rows, "feedback/validation": [fb_row(99)]})

    def targets(out, **options):
        build(str(src), out, options=Options(subsets="feedback", **options), progress=False)
        return [(line["id"]) for line in read_jsonl(out / "feedback" / "train.jsonl")]

    one = targets(tmp_path / "a")
    assert one == targets(tmp_path / "b")  # same seed, same draw
    assert len(one) == 24
    picked = Counter(i.split("/")[-1] for i in one if "/response1/" in i)
    assert len(picked) > 1  # the draw is not always the first text
    assert targets(tmp_path / "c", seed=7) != one
    every = targets(tmp_path / "d", feedback_targets="all")
    assert len(every) == 12 * (3 + 1) and set(one) <= set(every)


def test_select_pairs_order_and_weight_ties_rejected(sample_all):
    source = [json.loads(line) for line in (SAMPLE_DIR / "preference" / "train.jsonl").read_text().splitlines()]
    pairs = {p["source"]["row"]: p for p in read_jsonl(sample_all / "select" / "train.jsonl")}
    rejected = [r for r in read_jsonl(sample_all / "rejected.jsonl") if (r["subset"], r["split"]) == ("preference", "train")]
    ties = [i for i, r in enumerate(source) if r["overall_preference"] == 0]
    assert ties and {r["row"] for r in rejected if r["reason"] == "tie"} == set(ties)
    for i, record in enumerate(source):
        if i in ties:
            assert i not in pairs
            continue
        if i not in pairs:
            continue  # the leaked row, tested below
        pair = pairs[i]
        better, worse = ("response1", "response2") if record["overall_preference"] < 0 else ("response2", "response1")
        assert pair["chosen"][0]["content"] == record[better] and pair["rejected"][0]["content"] == record[worse]
        assert pair["weight"] == abs(record["overall_preference"]) > 0
        assert pair["prompt"] == record["context"]
    counts = json.loads((sample_all / "manifest.json").read_text())["counts"]["preference/train"]
    assert counts["rejected_by_reason"]["tie"] == len(ties)
    assert counts["read"] == counts["used"] + counts["rejected"]


def test_leak_across_subsets_is_removed_and_reported(tmp_path):
    shared = fb_row(1)
    src = write_source(tmp_path / "src", {
        "feedback/validation": [shared],
        # preference/train repeats (context, response2) of the feedback validation row: a leak.
        "preference/train": [pref_row(5, 2, context=shared["context"], response2=shared["response2"]), pref_row(6, -1)],
        # an edit/train row whose (context, original_response) is a held-out response1: a leak too.
        "edit/train": [{"domain": "general", "language": "english", "context": shared["context"],
                        "original_response": shared["response1"], "edited_response": "x", "feedback": []}],
        # a tie in validation still holds its responses out.
        "preference/validation": [pref_row(7, 0)],
        "feedback/train": [fb_row(2, context=pref_row(7, 0)["context"], response1=pref_row(7, 0)["response1"]), fb_row(3)],
    })
    manifest = build(str(src), tmp_path / "out", options=Options(subsets=ALL), progress=False)
    leaked = {leak["row"]: leak["matches"] for leak in manifest["leakage"]["rows"]}
    assert leaked == {"preference/train/0": ["feedback/validation/0"], "edit/train/0": ["feedback/validation/0"],
                      "feedback/train/0": ["preference/validation/0"]}
    assert [p["id"] for p in read_jsonl(tmp_path / "out" / "select" / "train.jsonl")] == ["preference/train/1"]
    assert {line["source"]["row"] for line in read_jsonl(tmp_path / "out" / "feedback" / "train.jsonl")} == {1}
    kept = build(str(src), tmp_path / "kept", options=Options(subsets=ALL, keep_leaked=True), progress=False)
    assert kept["counts"]["preference/train"]["used"] == 2


@pytest.mark.parametrize("subset,row,reason", [
    ("feedback", fb_row(0, feedback2=[]), "no_feedback"),
    ("feedback", fb_row(0, feedback1=["Great answer."]), "feedback_without_helpfulness"),
    ("feedback", fb_row(0, response2="  "), "empty_response"),
    ("preference", pref_row(0, 4), "preference_out_of_range"),
    ("preference", pref_row(0, "2"), "wrong_type"),
    ("preference", pref_row(0, 1, response2="print(0) "), "equal_pairs"),
    ("preference", pref_row(0, 2, context=[{"role": "assistant", "content": "hi"}]), "context_first_not_user"),
])
def test_unusable_rows_are_rejected_with_a_reason(tmp_path, subset, row, reason):
    other = fb_row(9) if subset == "feedback" else pref_row(9, 1)
    src = write_source(tmp_path / "src", {f"{subset}/train": [row, other]})
    manifest = build(str(src), tmp_path / "out", options=Options(subsets=subset), progress=False)
    assert manifest["counts"][f"{subset}/train"]["rejected_by_reason"] == {reason: 1}
    assert [r["reason"] for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")] == [reason]


def test_cli_subsets_and_errors(tmp_path):
    out = tmp_path / "out"
    done = run_cli("-m", "data_prep", "--source", str(SAMPLE_DIR), "--out", str(out), "--subsets", "preference,feedback",
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "feedback 16+8, select" in done.stdout and "tie" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["feedback", "manifest.json", "rejected.jsonl", "select"]
    again = run_cli("-m", "data_prep", "--source", str(SAMPLE_DIR), "--out", str(out), "--subsets", "feedback,preference",
                    "--no-progress")
    assert "up to date" in again.stdout
    bad = run_cli("-m", "data_prep", "--source", str(SAMPLE_DIR), "--out", str(tmp_path / "x"), "--subsets", "edits")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--subsets" in bad.stderr
    src = write_source(tmp_path / "s", {})
    (src / "feedback" / "train.jsonl").unlink()
    build(str(src), tmp_path / "y", options=Options(subsets="edit"), progress=False)  # feedback/ not asked for
    with pytest.raises(UserError, match="feedback/train.jsonl.gz"):
        build(str(src), tmp_path / "z", options=Options(subsets="feedback"), progress=False)
