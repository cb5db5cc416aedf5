"""The eval stage end to end (tiny model + tiny reward model + data_prep-shaped fixture data),
eval-compare, the held-out refusal, and what the eval reads from a data dir."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import run_cli, write_eval_data

FAST = ["eval.max_new_tokens=6", "eval.bootstrap_samples=100", "eval.batch_size=8"]


def _linked_checkpoint(src: Path, dst: Path, trained_on: list[str]) -> Path:
    """A checkpoint dir (the tiny model's files, linked) with a training record."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        os.symlink(f, dst / f.name)
    (dst / "hs3_training.json").write_text(json.dumps(
        {"stage": "sft", "trained_on": trained_on, "data_manifest_sha256": "0" * 64, "init": "builtin:tiny"}))
    return dst


def _ends_its_turn(checkpoint: Path) -> Path:
    """The tiny model answers every prompt with the same first token and never with <|eot_id|>: its
    edits would all be cut at max_new_tokens (left out of the win rates). This checkpoint's
    generation_config.json ends the turn at that token too, so its (empty) edits are finished ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model, tok = AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    first = int(model.generate(**ids, max_new_tokens=1, do_sample=False)[0, -1])
    config = GenerationConfig.from_pretrained(checkpoint)
    (checkpoint / "generation_config.json").unlink()
    config.eos_token_id = [config.eos_token_id, first]
    config.save_pretrained(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def eval_dir(tiny_model_dir, tiny_rm_dir, tmp_path_factory) -> Path:
    data = write_eval_data(tmp_path_factory.mktemp("leaky_data"), leakage={"edit": {"train_leaked": 3, "removed": 3}})
    out = tmp_path_factory.mktemp("runs") / "sft_eval"
    checkpoint = _ends_its_turn(_linked_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("ckpt") / "final",
                                                   ["edit/train"]))
    args = ["-m", "launcher", "eval", f"model={checkpoint}", f"data={data}", f"rm={tiny_rm_dir}", f"out={out}",
            "eval.gold_rm=builtin:tiny-gold", *FAST]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out.parent / "stdout.txt").write_text(proc.stdout)
    (out.parent / "args.json").write_text(json.dumps(args))
    (out.parent / "checkpoint.txt").write_text(str(checkpoint))
    return out


def test_eval_cli_writes_the_report_files(eval_dir, eval_data_dir):
    for name in ("generations.jsonl", "report.json", "report.md", "summary.json", "config.yaml",
                 "metrics.png", "copy_rate.png", "length_ratio.png"):
        assert (eval_dir / name).is_file(), name
    report = json.loads((eval_dir / "report.json").read_text())
    for key in ("copy_rate", "gold_reward_win_rate", "gold_reward_win_rate_vs_reference", "proxy_reward_win_rate",
                "proxy_reward_win_rate_vs_reference", "chrf", "chrf_sentence_mean", "rouge_l", "gold_rm_accuracy",
                "rm_accuracy", "policy_pref_accuracy"):
        assert isinstance(report[key], float), key
    # the self-referential figure is only there as the proxy; the gold scorer is named in the report
    assert "reward_win_rate" not in report and report["meta"]["gold"]["reward_model"] == "builtin:tiny-gold"
    assert report["meta"]["proxy_reward_model"] == report["meta"]["reward_model"]
    prompts = [json.loads(l) for l in (eval_data_dir / "prompts" / "validation.jsonl").read_text().splitlines()]
    lines = [json.loads(l) for l in (eval_dir / "generations.jsonl").read_text().splitlines()]
    assert [l["id"] for l in lines] == [p["id"] for p in prompts]
    # domain and language come from the sft rows with the same prompt (prompts rows lack them)
    assert {l["domain"] for l in lines} == {"general", "stem", "code", "multilingual"}
    assert {l["language"] for l in lines} <= set(report["by_language"]) and "unknown" not in report["by_language"]
    assert set(report["by_domain"]) == {"code", "general", "multilingual", "stem"}
    # every row carries all its metrics, and the report's means are the rows' means
    for key in ("copy_exact", "near_copy", "chrf", "chrf_stats", "rouge_l", "length_ratio", "empty", "truncated",
                "proxy_win_vs_original", "proxy_win_vs_reference", "proxy_reward_generated", "gold_win_vs_original",
                "gold_win_vs_reference", "gold_reward_generated"):
        assert all(key in l["metrics"] for l in lines), key
    # chrF++ at corpus level (sacrebleu's corpus_chrf over the rows), the sentence-level mean second
    import sacrebleu

    references = {p["id"]: p["reference_edit"] for p in prompts}
    corpus = sacrebleu.corpus_chrf([l["generated"] for l in lines], [[references[l["id"]] for l in lines]], word_order=2)
    assert report["chrf"] == pytest.approx(corpus.score)
    mean_chrf = sum(l["metrics"]["chrf"] for l in lines) / len(lines)
    assert report["chrf_sentence_mean"] == pytest.approx(mean_chrf)
    # the gold and proxy scorers are different models: their scores differ
    assert [l["metrics"]["gold_reward_generated"] for l in lines] != [l["metrics"]["proxy_reward_generated"] for l in lines]
    low, high = report["overall"]["length_ratio"]["ci"]
    assert low <= report["length_ratio"] <= high
    assert report["counts"]["rows"] == 8 and report["counts"]["pairs"] == 16 and report["counts"]["errors"] == 0
    assert report["counts"]["proxy_scorer_failures"] == 0 and report["counts"]["gold_scorer_truncated"] == 0
    code = report["by_domain"]["code"]["copy_rate"]
    assert code["n"] == sum(l["domain"] == "code" for l in lines)
    # likelihood metrics: one line per pair, and per group too
    pairs = [json.loads(l) for l in (eval_dir / "likelihood.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and all("rm_correct" in p["metrics"] for p in pairs)
    assert sum("policy_correct" in p["metrics"] for p in pairs) == 8  # good_vs_bad pairs only
    korean = [p["metrics"]["rm_correct"] for p in pairs if p["language"] == "korean"]
    assert report["by_language"]["korean"]["rm_accuracy"]["value"] == pytest.approx(sum(korean) / len(korean))
    assert "copy_rate" not in report["by_language"]["korean"]  # no edit row in Korean
    assert report["rm_accuracy"] == pytest.approx(sum(p["metrics"]["rm_correct"] for p in pairs) / 16)
    assert all("gold_rm_correct" in p["metrics"] for p in pairs)
    md = (eval_dir / "report.md").read_text()
    assert "## Per domain" in md and "## Per language" in md and "95% CI" in md
    assert "training RM (optimised against)" in md and "gold RM win rate vs original" in md
    # the headline table leads with the copy rate, then the gold win rates, corpus chrF++ and ROUGE-L
    table = md[md.index("## Overall"):md.index("## Per domain")]
    labels = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "metric" not in line]
    assert labels[:5] == ["copy rate (exact)", "gold RM win rate vs original", "gold RM win rate vs human edit",
                          "chrF++ vs human edit (corpus)", "ROUGE-L vs human edit"], labels
    assert "tiny random causal LM" in md  # the smoke's gold scorer says what it is
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["stage"] == "eval" and summary["value"] == report[summary["metric"]]
    # every edit ended its turn: the win rates are over all 8, nothing cut
    assert report["counts"]["finish_reasons"] == {"stop": 8, "length": 0, "error": 0} and report["cut_share"] == 0.0
    assert report["overall"]["gold_reward_win_rate"]["n"] == 8 and "over the 8 finished edits; 0 cut" in md
    stdout = (eval_dir.parent / "stdout.txt").read_text()
    assert "leakage flagged by the data manifest: edit.train_leaked=3, edit.removed=3" in stdout
    assert "gold_reward_win_rate=" in stdout and "proxy_reward_win_rate=" in stdout
    assert summary["metric"] == "gold_reward_win_rate"
    assert "trained on another data build" in stdout  # the record's manifest sha differs from this data's
    assert stdout.strip().splitlines()[-1].startswith("eval: ")


def test_report_names_what_produced_every_figure(eval_dir, tiny_rm_dir):
    """meta.provenance: the model under test, each scorer with its content fingerprint and the settings it
    scored at, the data (manifest sha256, split, ids), the sampling and the prompt budget."""
    from eval.reward_scorers import TINY_GOLD, resolve_spec
    from hs3.io import sha256_file
    from recipes.provenance import model_fingerprint

    report = json.loads((eval_dir / "report.json").read_text())
    provenance = report["meta"]["provenance"]
    checkpoint = (eval_dir.parent / "checkpoint.txt").read_text()
    model = provenance["model"]
    assert model["path"] == checkpoint and model["fingerprint"] == model_fingerprint(checkpoint)
    # its record predates dtype/seq_len: config.json's (not the tiny preset's seq_len 1024)
    assert (model["dtype"], model["seq_len"], model["seq_len_from"]) == ("float32", 2048, "config.json")
    proxy, gold = provenance["scorers"]["proxy_rm"], provenance["scorers"]["gold_rm"]
    assert proxy["path"] == str(tiny_rm_dir) and proxy["fingerprint"] == model_fingerprint(tiny_rm_dir)
    assert proxy["kind"] == "seqcls" and proxy["max_length"] == 2048 and proxy["dtype"] == "float32"
    assert gold["path"] == TINY_GOLD and gold["fingerprint"] == model_fingerprint(resolve_spec(TINY_GOLD))
    assert gold["kind"] == "first_logit" and gold["input"] == "context" and provenance["scorers"]["judge"] is None
    gold_config = json.loads((Path(resolve_spec(TINY_GOLD)) / "config.json").read_text())  # no record: its config's
    assert (gold["dtype"], gold["max_length"]) == (gold_config["dtype"], gold_config["max_position_embeddings"])
    assert gold["settings_from"] == {"dtype": "config.json", "seq_len": "config.json"}
    data_dir = Path(report["meta"]["data_dir"])
    assert provenance["data"]["manifest_sha256"] == sha256_file(data_dir / "manifest.json")
    assert provenance["data"]["split"] == "validation" and provenance["data"]["rows"] == 8
    assert provenance["sampling"] == {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 1234}
    assert "## Provenance" in (eval_dir / "report.md").read_text()


def test_rerun_from_scratch_gives_the_same_bytes(eval_dir, tmp_path):
    args = json.loads((eval_dir.parent / "args.json").read_text())
    again = tmp_path / "again"
    proc = run_cli(*[a if not a.startswith("out=") else f"out={again}" for a in args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("generations.jsonl", "likelihood.jsonl", "report.json", "report.md", "metrics.png", "length_ratio.png"):
        assert (again / name).read_bytes() == (eval_dir / name).read_bytes(), name


def test_eval_compare_side_by_side(eval_dir, tmp_path):
    second = tmp_path / "other"
    second.mkdir()
    report = json.loads((eval_dir / "report.json").read_text())
    report["overall"]["copy_rate"] = {"value": 0.25, "ci": [0.0, 0.5], "n": 8}
    (second / "report.json").write_text(json.dumps(report))
    proc = run_cli("-m", "launcher", "eval-compare", str(eval_dir), str(second), "--names", "sft,rl", "--out", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(table) == ["sft", "rl"]
    assert table["rl"]["copy_rate"]["value"] == 0.25
    assert table["sft"]["chrf"] == report["overall"]["chrf"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| metric | sft | rl |" in md and "25.0% [0.0%, 50.0%]" in md
    assert (tmp_path / "cmp" / "metrics_per_checkpoint.png").stat().st_size > 1000
    # the over-optimisation view: training-RM win rate against the gold win rate, per checkpoint
    assert (tmp_path / "cmp" / "proxy_vs_gold.png").stat().st_size > 1000 and "proxy vs gold per checkpoint" in proc.stdout
    proc = run_cli("-m", "launcher", "eval-compare", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no report.json" in proc.stderr


def test_eval_compare_paired_matches_rows_by_id_and_gives_a_verdict_per_metric(eval_dir, tmp_path):
    """Two evals of the same rows (as ours and NVIDIA's released Edit model would be): per metric the
    difference with a paired-bootstrap CI and a within/outside verdict; rows matched by id, rows missing or
    failed on a side left out and counted."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.json").write_text((eval_dir / "report.json").read_text())
    (theirs / "likelihood.jsonl").write_text((eval_dir / "likelihood.jsonl").read_text())
    lines = [json.loads(l) for l in (eval_dir / "generations.jsonl").read_text().splitlines()]
    changed = []
    for line in lines:
        line = json.loads(json.dumps(line))
        line["metrics"]["copy_exact"] = 1.0  # theirs copies every original: ours is lower on every row
        changed.append(line)
    changed[1] = {**changed[1], "error": "BadRequestError: too long", "metrics": {}}  # failed on their side
    changed = list(reversed(changed[:-1]))  # the last row missing; the order differs: matching is by id
    (theirs / "generations.jsonl").write_text("".join(json.dumps(l) + "\n" for l in changed))
    out = tmp_path / "paired"
    proc = run_cli("-m", "launcher", "eval-compare", "--paired", str(eval_dir), str(theirs), "--names", "ours,nvidia",
                   "--out", str(out), "--bootstrap-samples", "200")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "paired.json").read_text())
    assert result["only_in_a"] == 1 and result["failed_rows_left_out"] == 1 and result["matched_rows"] == 7 + 16
    copy = result["metrics"]["copy_rate"]
    assert copy["n"] == 6 and copy["diff"] == -1.0 and copy["ci"] == [-1.0, -1.0] and copy["verdict"] == "outside"
    chrf = result["metrics"]["chrf"]  # same texts on both sides: no difference, the CI is [0, 0]
    assert chrf["diff"] == 0.0 and chrf["verdict"] == "within" and chrf["a"] == pytest.approx(chrf["b"])
    assert result["metrics"]["rm_accuracy"]["n"] == 16 and result["metrics"]["rm_accuracy"]["verdict"] == "within"
    assert "copy rate (exact): ours 0.0% vs nvidia 100.0%, diff -100.0% [-100.0%, -100.0%]: outside the CI: ours lower" \
        in proc.stdout
    assert "chrF++ vs human edit (corpus): ours" in proc.stdout and "within the CI: no difference shown" in proc.stdout
    md = (out / "paired.md").read_text()
    assert "| metric | ours | nvidia | ours - nvidia [95% CI] | n | verdict |" in md
    proc = run_cli("-m", "launcher", "eval-compare", "--paired", str(eval_dir), str(theirs), str(theirs))
    assert proc.returncode == 2 and "exactly two eval dirs" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_refuses_a_model_trained_on_the_held_out_split(tiny_model_dir, eval_data_dir, tmp_path):
    checkpoint = _linked_checkpoint(tiny_model_dir, tmp_path / "final", ["edit/train", "edit/validation"])
    proc = run_cli("-m", "launcher", "eval", f"model={checkpoint}", f"data={eval_data_dir}", "rm=null",
                   f"out={tmp_path / 'out'}", *FAST)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "was trained on edit/validation" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_refuses_a_reward_model_trained_on_the_held_out_pairs(tiny_model_dir, tiny_rm_dir, eval_data_dir, tmp_path):
    rm = _linked_checkpoint(tiny_rm_dir, tmp_path / "rm", ["edit_quality/train", "edit_quality/validation"])
    proc = run_cli("-m", "launcher", "eval", f"model={tiny_model_dir}", f"data={eval_data_dir}", f"rm={rm}",
                   f"out={tmp_path / 'out'}", *FAST)
    assert proc.returncode == 2 and "reward model" in proc.stderr and "edit_quality/validation" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["data=/nonexistent"], "data_dir=/nonexistent: no such directory"),
    (["rm=/nonexistent/rm"], "reward_model=/nonexistent/rm: no such checkpoint"),
    (["model=tiny", "init=/nonexistent/rl/final"], "init=/nonexistent/rl/final: no such checkpoint"),
])
def test_bad_paths_are_one_line_errors(args, message, tiny_model_dir, eval_data_dir, tmp_path):
    base = {"model": f"model={tiny_model_dir}", "data": f"data={eval_data_dir}", "rm": "rm=null"}
    for arg in args:
        base[arg.split("=")[0]] = arg
    proc = run_cli("-m", "launcher", "eval", *base.values(), f"out={tmp_path}", *FAST)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_the_gold_reward_model_cannot_be_the_training_one(tiny_model_dir, tiny_rm_dir, eval_data_dir, tmp_path):
    proc = run_cli("-m", "launcher", "eval", f"model={tiny_model_dir}", f"data={eval_data_dir}", f"rm={tiny_rm_dir}",
                   f"eval.gold_rm={tiny_rm_dir}", f"out={tmp_path / 'out'}", *FAST)
    assert proc.returncode == 2 and "this eval's training reward model (rm=)" in proc.stderr, proc.stderr
    assert "policy's lineage" in proc.stderr and proc.stderr.strip().count("\n") == 0
    gold = _linked_checkpoint(tiny_rm_dir, tmp_path / "gold", ["edit_quality/validation"])
    proc = run_cli("-m", "launcher", "eval", f"model={tiny_model_dir}", f"data={eval_data_dir}", "rm=null",
                   f"eval.gold_rm={gold}", f"out={tmp_path / 'out'}", *FAST)
    assert proc.returncode == 2 and "gold reward model" in proc.stderr and "edit_quality/validation" in proc.stderr


def test_without_the_pipelines_reward_model_the_reward_metrics_are_skipped(tiny_model_dir, eval_data_dir, tmp_path):
    proc = run_cli("-m", "launcher", "eval", f"model={tiny_model_dir}", f"data={eval_data_dir}", f"run_dir={tmp_path}",
                   "eval.max_rows=2", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"no reward model at {tmp_path}/rm/final: reward metrics skipped" in proc.stdout
    out = tmp_path / "eval" / tiny_model_dir.name  # each model's eval in its own dir
    report = json.loads((out / "report.json").read_text())
    assert report["proxy_reward_win_rate"] is None and report["rm_accuracy"] is None
    assert report["gold_reward_win_rate"] is None  # no gold scorer configured
    assert report["counts"]["rows"] == 2 and isinstance(report["policy_pref_accuracy"], float)
    assert json.loads((out / "summary.json").read_text())["metric"] == "copy_rate"


def test_which_model_is_scored(tiny_model_dir, tmp_path):
    """Exactly what the user named: init= when given; else what model= names (never the run's rl/final);
    else the run's rl/final."""
    from eval.target import model_under_test
    from recipes.config import compose

    init = tmp_path / "rl" / "final"
    init.mkdir(parents=True)
    run = f"run_dir={tmp_path}"
    assert model_under_test(compose("eval", [run, f"model={tiny_model_dir}"])) == str(tiny_model_dir)
    assert model_under_test(compose("eval", [run, "model=http://127.0.0.1:8000/v1"])) == "http://127.0.0.1:8000/v1"
    assert model_under_test(compose("eval", [run, "model=tiny"])) is None  # the tiny model itself, not rl/final
    assert model_under_test(compose("eval", [run, "model=nvidia/Llama-3.3-Nemotron-70B-Edit"])) is None  # the hub id
    assert model_under_test(compose("eval", [run])) == str(init)  # nothing named: the run's policy
    assert model_under_test(compose("eval", [run, "model=tiny", f"init={init}"])) == str(init)
    assert model_under_test(compose("eval", [run, f"model={tiny_model_dir}", f"init={init}"])) == str(init)


def test_data_loading_limits_and_pair_kinds(eval_data_dir):
    from eval.data import load_edit_rows, load_pairs

    assert len(load_edit_rows(eval_data_dir, "validation", max_rows=3)) == 3
    pairs = load_pairs(eval_data_dir, "validation", max_rows=2)
    assert [p["kind"] for p in pairs].count("good_vs_bad") == 2 and len(pairs) == 4
    assert load_pairs(eval_data_dir, "test") == []


def test_dry_run_loads_and_writes_nothing(tmp_path):
    proc = run_cli("-m", "launcher", "eval", "--dry-run", f"run_dir={tmp_path / 'nothing'}")
    assert proc.returncode == 0, proc.stderr
    assert "eval: dry run, would score" in proc.stdout and f"{tmp_path / 'nothing'}/rl/final on" in proc.stdout
    assert f"-> {tmp_path / 'nothing'}/eval/rl/report.json" in proc.stdout
    proc = run_cli("-m", "launcher", "eval", "--dry-run", "model=tiny", f"run_dir={tmp_path / 'nothing'}")
    assert "would score builtin:tiny on" in proc.stdout and "rl/final on" not in proc.stdout
    assert not (tmp_path / "nothing").exists()


def _copy_eval(eval_dir: Path, dst: Path, edit=None) -> Path:
    """Another eval dir with the same rows; `edit(report)` changes its report.json."""
    dst.mkdir(parents=True)
    for name in ("generations.jsonl", "likelihood.jsonl"):
        (dst / name).write_text((eval_dir / name).read_text())
    report = json.loads((eval_dir / "report.json").read_text())
    if edit:
        edit(report)
    (dst / "report.json").write_text(json.dumps(report))
    return dst


def test_a_paired_compare_of_differently_scored_reports_is_refused_naming_the_field(eval_dir, tmp_path):
    """Another gold scorer, another data build, another max_new_tokens: --paired refuses with one line that
    names the field; --allow-mismatch compares with the warnings leading; the side-by-side table leads with them."""
    def other_gold(report):
        report["meta"]["provenance"]["scorers"]["gold_rm"]["fingerprint"] = "f" * 64

    def other_data(report):
        report["meta"]["provenance"]["data"]["manifest_sha256"] = "0" * 64
        report["meta"]["provenance"]["sampling"]["max_new_tokens"] = 4096

    gold = _copy_eval(eval_dir, tmp_path / "gold", other_gold)
    proc = run_cli("-m", "launcher", "eval-compare", "--paired", str(eval_dir), str(gold), "--out", str(tmp_path / "p"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert 'not comparable: gold reward model differs (scorers.gold_rm.fingerprint): ' in proc.stderr
    assert f'"{"f" * 64}"' in proc.stderr
    assert not (tmp_path / "p" / "paired.json").exists()
    data = _copy_eval(eval_dir, tmp_path / "data", other_data)
    proc = run_cli("-m", "launcher", "eval-compare", "--paired", str(eval_dir), str(data), "--out", str(tmp_path / "p"))
    assert proc.returncode == 2 and "data (manifest sha256) differs (data.manifest_sha256)" in proc.stderr
    assert "(and 1 more)" in proc.stderr
    proc = run_cli("-m", "launcher", "eval-compare", "--paired", str(eval_dir), str(data), "--out", str(tmp_path / "p"),
                   "--allow-mismatch", "--bootstrap-samples", "50")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("warning: data (manifest sha256) differs")
    assert "max_new_tokens differs (sampling.max_new_tokens)" in proc.stdout
    paired = json.loads((tmp_path / "p" / "paired.json").read_text())
    assert len(paired["warnings"]) == 2 and (tmp_path / "p" / "paired.md").read_text().count("> warning:") == 2
    proc = run_cli("-m", "launcher", "eval-compare", str(eval_dir), str(gold), "--out", str(tmp_path / "side"))
    assert proc.returncode == 0 and proc.stdout.startswith("warning: gold reward model differs"), proc.stdout
    assert (tmp_path / "side" / "compare.md").read_text().count("> warning: gold reward model differs") == 1
    for key, value in (("dtype", "bfloat16"), ("max_length", 4096)):  # the same RM, run at other settings
        def other_settings(report, key=key, value=value):
            assert report["meta"]["provenance"]["scorers"]["proxy_rm"][key] != value
            report["meta"]["provenance"]["scorers"]["proxy_rm"][key] = value

        other = _copy_eval(eval_dir, tmp_path / f"proxy-{key}", other_settings)
        proc = run_cli("-m", "launcher", "eval-compare", "--paired", str(eval_dir), str(other), "--out", str(tmp_path / "p"))
        ours = json.loads((eval_dir / "report.json").read_text())["meta"]["provenance"]["scorers"]["proxy_rm"][key]
        # the line names the part of the scorer that differs, with both values (not a cut-off tuple)
        line = (f"training RM (proxy scorer) differs (scorers.proxy_rm.{key}): "
                f"{eval_dir.name} {json.dumps(ours)} vs proxy-{key} {json.dumps(value)}")
        assert proc.returncode == 2 and line in proc.stderr, proc.stderr
    same = _copy_eval(eval_dir, tmp_path / "same")
    proc = run_cli("-m", "launcher", "eval-compare", "--paired", str(eval_dir), str(same), "--out", str(tmp_path / "p2"),
                   "--bootstrap-samples", "50")
    assert proc.returncode == 0 and "warning" not in proc.stdout


@pytest.mark.parametrize("report, message", [
    ({}, "overall is missing, not an object"),
    ([], "a JSON list, not an object"),
    (None, "a JSON NoneType, not an object"),
    ("text", "a JSON str, not an object"),
    ({"overall": None, "meta": {}, "counts": {}}, "overall is NoneType, not an object"),
    ({"overall": {"copy_rate": {"value": "high", "ci": [0, 1], "n": 3}}, "meta": {}, "counts": {}},
     "overall.copy_rate has no numeric value"),
    ({"overall": {"copy_rate": {"value": 0.5, "ci": [0, 1], "n": "3"}}, "meta": {}, "counts": {}}, "overall.copy_rate.n"),
    ({"overall": {}, "meta": {}, "counts": {}}, "no provenance"),
])
def test_eval_compare_treats_every_report_as_untrusted(report, message, eval_dir, tmp_path, capsys):
    from eval.compare import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text(json.dumps(report))
    for argv in ([str(eval_dir), str(bad)], ["--paired", str(eval_dir), str(bad)]):
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err


def test_eval_compare_bad_rows_out_and_samples_are_one_line_errors(eval_dir, tmp_path, capsys):
    import stat

    from eval.compare import main

    rows = _copy_eval(eval_dir, tmp_path / "rows")
    lines = (rows / "generations.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["metrics"]["rouge_l"] = "0.5"
    (rows / "generations.jsonl").write_text("\n".join(lines[:2] + [json.dumps(row)] + lines[3:]) + "\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    cases = [(["--paired", str(eval_dir), str(rows)], "generations.jsonl line 3: metrics.rouge_l is \"0.5\", not a number"),
             (["--paired", str(eval_dir), str(eval_dir), "--bootstrap-samples", "-5"], "--bootstrap-samples=-5: must be >= 1"),
             (["--paired", str(eval_dir), str(eval_dir), "--bootstrap-samples", "0"], "--bootstrap-samples=0"),
             ([str(eval_dir), "--out", str(eval_dir / "report.json" / "sub")], "cannot create it"),
             (["--paired", str(eval_dir), str(eval_dir), "--out", str(eval_dir / "report.json")], "cannot create it")]
    if os.geteuid() != 0:  # root writes anywhere
        cases += [([str(eval_dir), "--out", str(locked / "sub")], "cannot create it"),
                  ([str(eval_dir), "--out", str(locked)], "not writable")]
    try:
        for argv, message in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert message in err and err.strip().count("\n") == 0, (argv, err)
    finally:
        locked.chmod(stat.S_IRWXU)


def test_a_reward_model_whose_config_does_not_fit_its_weights_is_a_one_line_error(tiny_model_dir, tiny_rm_dir,
                                                                                 eval_data_dir, tmp_path):
    """A reward model dir with a causal LM's config.json (a converter that copies the policy's config leaves
    num_labels 2 against score.weight [1, H]): transformers raises a RuntimeError; the eval says what is wrong."""
    rm = tmp_path / "rm"
    rm.mkdir()
    for f in tiny_rm_dir.iterdir():
        (rm / f.name).write_bytes(f.read_bytes())
    config = json.loads((rm / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"])
    for key in ("id2label", "label2id", "num_labels"):
        config.pop(key, None)
    (rm / "config.json").write_text(json.dumps(config))
    (rm / "hs3_training.json").write_text(json.dumps(
        {"stage": "rm", "trained_on": ["edit_quality/train"], "data_manifest_sha256": "0" * 64, "init": "builtin:tiny"}))
    proc = run_cli("-m", "launcher", "eval", f"model={tiny_model_dir}", f"data={eval_data_dir}", f"rm={rm}",
                   f"out={tmp_path / 'out'}", *FAST)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.stderr.strip().count("\n") == 0  # said before anything is generated or loaded
    assert last == (f"error: reward_model={rm}: its score head has 1 output(s) but its config.json asks for 2 (a reward "
                    f"model needs \"num_labels\": 1; a converter that copies the policy's config.json leaves 2)")
    assert not (tmp_path / "out").exists()

    from eval.reward_scorers import load_scorer  # and where a scorer is loaded without that check
    from hs3.io import UserError

    with pytest.raises(UserError, match="its weights do not have the shapes its config.json asks for"):
        load_scorer(str(rm), "seqcls"), proc.stderr
