"""Every score names what produced it (issue 17, the eval half): the model under test is exactly what the
user named, each model is scored at its own settings, gold scoring stays out of the policy's lineage,
training records and reports carry content fingerprints, each model's eval has its own dir, cut edits
never count as finished ones, and the eval's modules import one way."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import run_cli, write_edit_data, write_eval_data

FAST = ["eval.max_new_tokens=6", "eval.bootstrap_samples=50", "eval.batch_size=8"]


def _record(final: Path, stage: str, args: list[str], **kwargs) -> dict:
    """final/hs3_training.json as the stage writes it (recipes.training.write_training_record)."""
    from recipes import training
    from recipes.config import compose

    return training.write_training_record(final, compose(stage, args), training.STAGE_SPLITS[stage], **kwargs)


def _trained(auto_class, source: Path, out: Path, shift: float) -> Path:
    """A model dir as a training stage saves one: `source`'s weights moved by `shift`, with its tokenizer."""
    import torch

    model = auto_class.from_pretrained(source)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(shift)
    model.save_pretrained(out)
    _copy_tokenizer(source, out)
    return out


def _copy_tokenizer(source: Path, out: Path) -> None:
    from recipes.provenance import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, Path(out) / name)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_rm_dir, varied_model_dir, tmp_path_factory) -> Path:
    """A run dir as the pipeline leaves it: data, sft/final, rm/final (+ rm/checkpoint-8, other weights),
    rl/final, each final/ with the training record its stage writes."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("run")
    args = [f"run_dir={root}"]
    write_edit_data(root / "data")
    _trained(AutoModelForCausalLM, tiny_model_dir, root / "sft" / "final", 0.01)
    _record(root / "sft" / "final", "sft", args)
    shutil.copytree(tiny_rm_dir, root / "rm" / "final")
    _record(root / "rm" / "final", "rm", args)
    _trained(AutoModelForSequenceClassification, tiny_rm_dir, root / "rm" / "checkpoint-8", 0.02)
    shutil.copytree(varied_model_dir, root / "rl" / "final")
    _record(root / "rl" / "final", "rl", args,
            inputs={"reward_model": {"scoring": {"max_length": 1024, "dtype": "float32"}}})  # as recipes/rl.py does
    return root


# ---- training records and fingerprints ------------------------------------------------------------

def test_training_records_list_their_inputs_with_content_fingerprints(run, tiny_model_dir):
    from hs3.io import sha256_file
    from recipes.provenance import model_fingerprint

    rl = json.loads((run / "rl" / "final" / "hs3_training.json").read_text())
    assert (rl["dtype"], rl["seq_len"]) == ("float32", 1024)
    inputs = rl["inputs"]
    assert inputs["base_model"]["path"] == "builtin:tiny"
    assert inputs["base_model"]["fingerprint"] == model_fingerprint(tiny_model_dir)
    assert inputs["init"]["path"] == f"{run}/sft/final"
    assert inputs["init"]["fingerprint"] == model_fingerprint(run / "sft" / "final")
    assert inputs["reference"] == inputs["init"]  # the KL reference is the initial policy
    assert inputs["reward_model"]["fingerprint"] == model_fingerprint(run / "rm" / "final")
    assert inputs["reward_model"]["scoring"] == {"max_length": 1024, "dtype": "float32"}
    assert inputs["data_manifest"]["sha256"] == sha256_file(run / "data" / "manifest.json") == rl["data_manifest_sha256"]
    rm = json.loads((run / "rm" / "final" / "hs3_training.json").read_text())
    assert rm["inputs"]["init"]["fingerprint"] == model_fingerprint(run / "sft" / "final")  # the sft model rm started from
    assert "reward_model" not in rm["inputs"] and "reference" not in rm["inputs"]


def test_the_fingerprint_follows_content_not_paths_files_or_sharding(run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from eval.reward_scorers import TINY_GOLD, resolve_spec
    from recipes.provenance import model_fingerprint

    sft = run / "sft" / "final"
    copy = shutil.copytree(sft, tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(sft)  # another path, other mtimes, a training record
    resharded = tmp_path / "resharded"
    AutoModelForCausalLM.from_pretrained(sft).save_pretrained(resharded, max_shard_size="100KB")
    _copy_tokenizer(sft, resharded)
    assert len(list(resharded.glob("*.safetensors"))) > 1
    assert model_fingerprint(resharded) == model_fingerprint(sft)
    # same config, same tensor shapes and file sizes, other weights: other fingerprints
    assert model_fingerprint(resolve_spec(TINY_GOLD)) != model_fingerprint(tiny_model_dir)
    assert model_fingerprint(run / "rm" / "checkpoint-8") != model_fingerprint(run / "rm" / "final")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0"}))
    assert model_fingerprint(copy) == model_fingerprint(sft)
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.1}))
    assert model_fingerprint(copy) != model_fingerprint(sft)
    assert model_fingerprint(tmp_path / "nothing") is None


# ---- gold scoring outside the policy's lineage ------------------------------------------------------

def test_gold_scoring_refuses_the_policys_lineage_and_names_the_link(run, tmp_path):
    """Before, only this eval's rm= path was compared: rm/final with rm=null, a byte copy of it, one of its
    checkpoints and the policy itself were all accepted as gold."""
    from eval.lineage import check_gold
    from eval.reward_scorers import TINY_GOLD, resolve_spec
    from hs3.io import UserError

    policy = str(run / "rl" / "final")
    copy = shutil.copytree(run / "rm" / "final", tmp_path / "gold-copy")
    checkpoint_copy = shutil.copytree(run / "rm" / "checkpoint-8", tmp_path / "gold-ckpt")
    descendant = shutil.copytree(resolve_spec(TINY_GOLD), tmp_path / "gold-trained" / "final")
    _record(descendant, "rm", [f"run_dir={tmp_path}", f"init={run}/rm/final"])
    cases = {
        run / "rm" / "final": f"is {run}/rm/final: {run}/rm/final is the reward_model of {policy}",
        copy: f"is a copy of {run}/rm/final (same content fingerprint",
        run / "rm" / "checkpoint-8": f"is a checkpoint of the run {run}/rm that wrote {run}/rm/final",
        checkpoint_copy: f"is a copy of {run}/rm/checkpoint-8, a checkpoint of the run that wrote {run}/rm/final",
        run / "rl" / "final": f"is {policy}: {policy} is the policy under test",
        run / "sft" / "final": f"is {run}/sft/final: {run}/sft/final is the init of {policy}",
        descendant: f"was trained from {run}/rm/final",
    }
    for gold, link in cases.items():
        with pytest.raises(UserError) as caught:
            check_gold(str(gold), str(gold), policy, None)
        message = str(caught.value)
        assert link in message and "policy's lineage" in message and "\n" not in message, (gold, message)
    # the same rm given as rm=: named as this eval's training reward model
    with pytest.raises(UserError, match="this eval's training reward model"):
        check_gold(str(copy), str(copy), None, str(run / "rm" / "final"))
    # an independent scorer passes; an endpoint cannot be checked and says so
    assert check_gold(TINY_GOLD, resolve_spec(TINY_GOLD), policy, str(run / "rm" / "final")) == []
    assert "cannot be checked" in check_gold("http://127.0.0.1:9/v1", None, policy, None)[0]


def test_the_eval_refuses_a_copy_of_the_training_rm_as_gold_before_loading_anything(run, tmp_path):
    gold = shutil.copytree(run / "rm" / "final", tmp_path / "gold")
    proc = run_cli("-m", "launcher", "eval", f"model={run}/rl/final", f"data={run}/data", "rm=null",
                   f"eval.gold_rm={gold}", f"out={tmp_path / 'out'}", *FAST)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"eval.gold_rm={gold} is a copy of {run}/rm/final" in proc.stderr and "reward_model of" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- the model under test is exactly what was named ---------------------------------------------------

def test_a_hub_id_that_cannot_be_loaded_is_refused_and_never_scored_as_the_runs_policy(run, tmp_path):
    """Before, `eval model=nvidia/... run_dir=RUN` scored RUN/rl/final."""
    hub_id = "nvidia/Llama-3.3-Nemotron-70B-Edit"
    proc = run_cli("-m", "launcher", "eval", f"model={hub_id}", f"run_dir={run}", *FAST,
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"model={hub_id}: a hub id that cannot be loaded here (HF_HUB_OFFLINE is set)" in proc.stderr
    assert f"vllm serve {hub_id}" in proc.stderr and "pass model=http://HOST:8000/v1" in proc.stderr
    assert not (run / "eval" / "Llama-3.3-Nemotron-70B-Edit").exists() and "rl/final" not in proc.stdout


def test_a_checkpoint_is_loaded_at_its_own_dtype_and_length_not_the_tiny_presets(tiny_model_dir, tmp_path):
    """model=PATH sits on the tiny preset (float32, seq_len 1024); a checkpoint whose record says bf16 /
    4096 is loaded in bf16 and known at 4096; without a record, config.json's dtype and context."""
    import torch

    from eval.target import generation_engine, model_under_test, target_settings
    from recipes.config import compose

    checkpoint = shutil.copytree(tiny_model_dir, tmp_path / "sft" / "final")
    _record(checkpoint, "sft", [f"run_dir={tmp_path}", "model.dtype=bfloat16", "train.seq_len=4096"])
    cfg = compose("eval", [f"model={checkpoint}"])
    assert (cfg.model.dtype, cfg.train.seq_len) == ("float32", 1024)
    target = model_under_test(cfg)
    settings = target_settings(cfg, target, target)
    assert (settings.dtype, settings.seq_len, settings.dtype_from) == ("bfloat16", 4096, "hs3_training.json")
    assert generation_engine(cfg, target).model.dtype == torch.bfloat16
    forced = compose("eval", [f"model={checkpoint}", "eval.dtype=float32"])
    assert generation_engine(forced, target).model.dtype == torch.float32
    plain = target_settings(cfg, str(tiny_model_dir), str(tiny_model_dir))
    assert (plain.dtype, plain.seq_len, plain.seq_len_from) == ("float32", 2048, "config.json")


def _long_conversation(tokenizer, words: int) -> list[dict]:
    text = " ".join(f"w{i % 50}" for i in range(words))
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "A short answer."},
            {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\n<None>"},
            {"role": "assistant", "content": "An edited answer."}]


def test_the_proxy_rm_scores_a_long_conversation_as_rl_scored_it(run, tiny_rm_dir, tmp_path):
    """rl scored its reward at its train.seq_len (4096 here), recorded in the policy's record; the eval's
    proxy reads it there. Before, the tiny preset's seq_len 1024 cut the conversation and the score moved."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from eval.run import proxy_scorer, proxy_settings
    from eval.data import training_record
    from recipes import reward, rl
    from recipes.config import compose

    policy = shutil.copytree(run / "rl" / "final", tmp_path / "rl" / "final")
    _record(policy, "rl", [f"run_dir={run}", f"rm={run}/rm/final", "train.seq_len=4096"],
            inputs={"reward_model": {"scoring": {"max_length": 4096, "dtype": "float32"}}})
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm_dir)
    conversation = _long_conversation(tokenizer, 550)
    length = reward.conversation_length(tokenizer, conversation)
    assert 1024 < length < 2048, length

    edit_reward = rl.EditReward(model, tokenizer, 4096, mask_truncated=False)  # the rl stage's reward at seq_len 4096
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    edit_reward.end_ids = {eot}
    completion = conversation[-1:]
    [as_rl] = edit_reward(prompts=[conversation[:-1]], completions=[completion],
                          completion_ids=[tokenizer(completion[0]["content"], add_special_tokens=False)["input_ids"] + [eot]],
                          original_response=["A short answer."])
    cfg = compose("eval", [f"model={policy}", f"rm={run}/rm/final"])
    settings, note = proxy_settings(str(run / "rm" / "final"), cfg, training_record(str(policy)))
    assert note is None and settings.seq_len == 4096 and "how rl scored" in settings.seq_len_from
    [as_eval] = proxy_scorer(str(run / "rm" / "final"), cfg, settings).score([conversation])
    assert as_eval == pytest.approx(as_rl, abs=1e-5)
    [at_1024] = reward.score_conversations(model, tokenizer, [conversation], 1024)
    assert abs(at_1024 - as_rl) > 1e-4  # what the tiny preset's length gave
    # a reward model the policy was not trained against: its own settings, and a note says so
    other, note = proxy_settings(str(run / "rm" / "checkpoint-8"), cfg, training_record(str(policy)))
    assert other.seq_len == 2048 and "is not the reward model the policy was trained against" in note


def test_the_select_eval_scores_at_its_models_own_length(tmp_path, tiny_rm_dir):
    from data_prep.build import Options, build
    from eval import select_eval
    from recipes.config import compose
    from tests.conftest import SAMPLE_DIR

    data = tmp_path / "data"
    build(str(SAMPLE_DIR), data, options=Options(subsets="preference"), progress=False)
    select = shutil.copytree(tiny_rm_dir, tmp_path / "select" / "final")
    record = _record(select, "rm", [f"run_dir={tmp_path}", "train.seq_len=4096"])
    (select / "hs3_training.json").write_text(json.dumps({**record, "stage": "select", "trained_on": ["preference/train"]}))
    cfg = compose("eval", [f"run_dir={tmp_path}", f"data={data}", f"init={select}", f"out={tmp_path / 'e'}",
                           "eval.task=select", "eval.bootstrap_samples=20", "eval.max_rows=4"])
    select_eval.run(cfg)
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["meta"]["max_len"] == 4096  # before: the tiny preset's train.seq_len, 1024
    assert report["meta"]["provenance"]["model"]["seq_len_from"] == "hs3_training.json"


# ---- each model's eval in its own dir ------------------------------------------------------------------

def test_each_models_eval_has_its_own_dir_and_a_dir_of_another_model_is_refused(run, tiny_model_dir, tmp_path):
    from launcher.pipeline import stage_args
    from recipes.config import compose

    r = f"run_dir={run}"
    assert compose("eval", [r]).out == f"{run}/eval/rl"
    assert compose("eval", [r, "model=nvidia/Llama-3.3-Nemotron-70B-Edit"]).out == f"{run}/eval/Llama-3.3-Nemotron-70B-Edit"
    assert compose("eval", [r, f"init={run}/rm/checkpoint-8"]).out == f"{run}/eval/rm-checkpoint-8"
    assert compose("eval", [r, "model=http://127.0.0.1:8000/v1"]).out == f"{run}/eval/127.0.0.1_8000"
    assert compose("eval", [r, "model=tiny", "eval.name=base"]).out == f"{run}/eval/base"
    chain, entry_args, _ = stage_args("default", [r, "model=tiny"])  # the pipeline's eval: rl/final into RUN/eval
    pipeline_eval = compose("eval", entry_args["eval"])
    assert (pipeline_eval.init, pipeline_eval.out) == (f"{run}/rl/final", f"{run}/eval")

    data = write_eval_data(tmp_path / "data")
    first = run_cli("-m", "launcher", "eval", f"model={run}/rl/final", f"data={data}", r, "rm=null", "eval.max_rows=2",
                    *FAST)
    assert first.returncode == 0, first.stderr[-2000:]
    out, policy = run / "eval" / "rl", (run / "rl" / "final").resolve()
    assert json.loads((out / "eval_model.json").read_text()) == {"model": str(policy)}
    second = run_cli("-m", "launcher", "eval", f"model={tiny_model_dir}", f"data={data}", r, "rm=null", f"out={out}",
                     "eval.max_rows=2", *FAST)
    assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr
    assert f"out={out} holds the eval of {policy}: scoring {tiny_model_dir.resolve()} there would overwrite it" \
        in second.stderr
    assert json.loads((out / "report.json").read_text())["meta"]["model"] == f"{run}/rl/final"


def test_an_out_dir_with_an_older_report_or_another_stage_is_refused(tmp_path):
    from eval.target import claim_out_dir
    from hs3.io import UserError

    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"meta": {"model": "http://a:1/v1"}}))
    with pytest.raises(UserError, match="holds the eval of http://a:1/v1"):
        claim_out_dir(old, {"model": "http://b:1/v1"})
    claim_out_dir(old, {"model": "http://a:1/v1"})  # the same model: rescored in place
    stage = tmp_path / "sft"
    stage.mkdir()
    (stage / "config.yaml").write_text("stage: sft\n")
    with pytest.raises(UserError, match="holds the output of another stage"):
        claim_out_dir(stage, {"model": "x"})


# ---- cut edits and the eval's other checks -------------------------------------------------------------

def test_win_rates_are_over_finished_edits_with_the_cut_share_beside_them(tiny_rm_dir):
    from eval.reward_scorers import load_scorer
    from eval.run import build_report, reward_model_metrics
    from eval.engines import Sampling
    from eval.report import render_markdown
    from recipes.config import compose

    prompt = [{"role": "user", "content": "Tell me about rain."}, {"role": "assistant", "content": "Rain is wet."},
              {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\nMore."}]
    rows = [{"id": f"r{i}", "prompt": prompt, "original_response": "Rain is wet.",
             "reference_edit": "Rain is water falling from clouds."} for i in range(4)]
    reasons = ["stop", "length", "stop", "length"]
    records = [{"id": f"r{i}", "domain": "general", "language": "english", "generated": f"Rain edit {i}",
                "finish_reason": reason, "error": None, "flagged_too_long": False, "prompt_shortened": False,
                "metrics": {"truncated": float(reason == "length")}} for i, reason in enumerate(reasons)]
    scorer = load_scorer(str(tiny_rm_dir), "seqcls")
    assert reward_model_metrics(scorer, "proxy", "edit_request", rows, records, [], []) == 0
    assert ["proxy_win_vs_original" in r["metrics"] for r in records] == [True, False, True, False]
    cfg = compose("eval", ["eval.bootstrap_samples=20"])
    report = build_report(cfg, "m", str(tiny_rm_dir), records, [], Sampling(), [])
    assert report["overall"]["proxy_reward_win_rate"]["n"] == 2 and report["cut_share"] == 0.5
    assert report["counts"]["finish_reasons"] == {"stop": 2, "length": 2, "error": 0}
    assert "over the 2 finished edits; 2 cut at max_new_tokens (cut share 50.0%)" in render_markdown(report)


def test_only_splits_that_exist_are_accepted(tmp_path):
    for args in ([], ["--dry-run"]):
        proc = run_cli("-m", "launcher", "eval", "eval.split=test", f"run_dir={tmp_path}", *args)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "eval.split=test: no such split (HelpSteer3's held-out split is validation)" in proc.stderr
    assert not (tmp_path / "eval").exists()


def test_the_eval_modules_import_one_way():
    """eval/run.py and eval/feedback_eval.py imported each other; now no eval module reaches back to one
    that imports it (imports inside functions counted too), and recipes never imports eval."""
    import ast

    from .conftest import REPO_ROOT

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        return names

    graph: dict[str, set[str]] = {}
    for path in (REPO_ROOT / "eval").glob("*.py"):
        names = imported(path)
        graph[path.stem] = {n.split(".")[1] for n in names if n.startswith("eval.") and n.split(".")[1] != path.stem}
        graph[path.stem] &= {p.stem for p in (REPO_ROOT / "eval").glob("*.py")}

    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in graph.get(start, ()))

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, {m: graph[m] for m in cycles}
    assert "target" in graph["run"] and "target" in graph["feedback_eval"] and "run" not in graph["feedback_eval"]
    for path in (REPO_ROOT / "recipes").rglob("*.py"):
        assert not any(n == "eval" or n.startswith("eval.") for n in imported(path)), path
