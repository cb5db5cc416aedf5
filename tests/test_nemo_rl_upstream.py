"""rm / rl / dpo on engine=megatron, checked by NeMo-RL's own code at the pinned commit (tests/upstream.toml:
nemo_rl v0.7.0, 81aa43d), run on CPU: its config loader over its own example YAMLs, its DTensor parallelize
dispatch on a tiny LlamaForSequenceClassification in a 32-rank world (torch's fake process group), and its
HF->Megatron conversion cache path. file:line are NeMo-RL's at that commit.

Some NeMo-RL modules import what this machine lacks at their top (hydra, zmq, megatron.bridge) for parts we
do not run. `upstream_module` executes such a module's own source statement by statement and leaves out only
the imports that fail (a function that needs one fails when called, never silently); `upstream_functions`
compiles named functions alone, from the file as pinned, when the module's other top-level code needs the
GPU stack."""
from __future__ import annotations

import __future__
import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from recipes.config import REPO_ROOT, compose
from recipes.megatron import nemo_rl
from tests.upstream import source


# ---- NeMo-RL's own code, from the pinned tree --------------------------------------------------------

def nemo_rl_tree() -> Path:
    return source("nemo_rl", "git")


def upstream_module(relative: str) -> types.ModuleType:
    """NeMo-RL's module at `relative`, its own statements executed in order; an import that fails here is
    left out (recorded in module.__skipped_imports__); any other failing statement is an error."""
    path = nemo_rl_tree() / relative
    if str(nemo_rl_tree()) not in sys.path:  # its own `from nemo_rl... import` (appended: never shadows ours)
        sys.path.append(str(nemo_rl_tree()))
    module = types.ModuleType("upstream_" + relative.replace("/", "_")[:-3])
    module.__file__ = str(path)
    module.__skipped_imports__ = []
    for node in ast.parse(path.read_text(), str(path)).body:
        code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
        try:
            exec(code, module.__dict__)
        except ImportError as exc:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                raise
            module.__skipped_imports__.append(str(exc))
    return module


def upstream_functions(relative: str, names: tuple[str, ...], namespace: dict) -> dict:
    """The named top-level functions of NeMo-RL's file, compiled from its source alone (annotations
    not evaluated: they name classes of imports we do not run) into `namespace`."""
    path = nemo_rl_tree() / relative
    tree = ast.parse(path.read_text(), str(path))
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(n.name for n in nodes) == sorted(names), f"{relative} no longer defines all of {names}"
    code = compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    return namespace


# ---- our stage configs, rendered as the job renders them ---------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "Write a haiku about rain."},
    {"role": "assistant", "content": "Rain falls."},
    {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\nToo short."},
]


def write_data(run_dir: Path, n_train: int = 24, n_validation: int = 4) -> None:
    """pairs/ and prompts/ in data_prep's layout: distinct prompts (the selection slice groups by prompt)."""
    data = run_dir / "data"
    for split, n in (("train", n_train), ("validation", n_validation)):
        prompts = [[*CONVERSATION[:-1], {"role": "user", "content": CONVERSATION[-1]["content"] + f" ({split} {i})" * (1 + i % 5)}]
                   for i in range(n)]
        pairs = [{"id": f"{split}-{i}", "prompt": p, "chosen": [{"role": "assistant", "content": f"good {i}"}],
                  "rejected": [{"role": "assistant", "content": "bad"}], "kind": "good_vs_bad"} for i, p in enumerate(prompts)]
        rl_prompts = [{"id": f"{split}-{i}", "prompt": p, "reference_edit": f"Rain falls softly {i}."}
                      for i, p in enumerate(prompts)]
        for folder, rows in (("pairs", pairs), ("prompts", rl_prompts)):
            (data / folder).mkdir(parents=True, exist_ok=True)
            (data / folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def link_init(run_dir: Path, model_dir: Path) -> Path:
    """RUN/sft/final: the policy the stages start from (a copy of the tiny model, so it can be rebuilt)."""
    import shutil

    final = run_dir / "sft" / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(model_dir, final)
    return final


def stage_cfg(stage: str, run_dir: Path, *extra: str):
    """The paper's 70B stage config on this run dir, its NeMo-RL tree the pinned one."""
    return compose(stage, ["engine=megatron", "model=llama33_70b", f"run_dir={run_dir}",
                           f"megatron.nemo_rl_dir={nemo_rl_tree()}", f"rm={run_dir / 'rm' / 'final'}", *extra])


@pytest.fixture()
def run_dir(tmp_path, tiny_model_dir) -> Path:
    write_data(tmp_path)
    link_init(tmp_path, tiny_model_dir)
    return tmp_path


# ---- finding 1: rm's policy through NeMo-RL's parallelize dispatch -----------------------------------

DISPATCH = r"""
import json, sys
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
sys.path.insert(0, sys.argv[1])
from tests.test_nemo_rl_upstream import upstream_module
parallelize = upstream_module("nemo_rl/models/dtensor/parallelize.py")
from transformers import LlamaConfig, LlamaForSequenceClassification

case = json.loads(sys.argv[2])
dtensor, world = case["dtensor_cfg"], case["world"]
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
tp, cp = dtensor["tensor_parallel_size"], dtensor["context_parallel_size"]
# the v1 worker's mesh and call (dtensor_policy_worker.py:345-352, 383-417)
mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world // tp // cp, cp, tp), mesh_dim_names=("dp", "cp", "tp"))
dp_cp = mesh[("dp", "cp")]._flatten(mesh_dim_name="dp_cp")
# num_labels 1: what the worker sets for a Bradley-Terry model (dtensor_policy_worker.py:296-309)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=8, num_labels=1, pad_token_id=0)
model = LlamaForSequenceClassification(config)
try:
    out = parallelize._parallelize_model(
        model, dp_cp, mesh["tp"], param_dtype=torch.bfloat16, sequence_parallel=dtensor["sequence_parallel"],
        cpu_offload=dtensor["cpu_offload"], activation_checkpointing=dtensor["activation_checkpointing"],
        custom_parallel_plan=dtensor["custom_parallel_plan"])
    result = {"ok": type(out).__name__, "sharded_over": dp_cp.size()}
except AssertionError as exc:
    result = {"error": f"AssertionError: {exc}"}
print("RESULT " + json.dumps(result))
dist.destroy_process_group()
"""


def dispatch(document: dict) -> dict:
    """NeMo-RL's _parallelize_model (parallelize.py:543) on a tiny LlamaForSequenceClassification, given the
    rendered rm policy's dtensor_cfg, in a fake-process-group world of the rendered cluster's size."""
    dtensor = document["policy"]["dtensor_cfg"]
    world = document["cluster"]["num_nodes"] * document["cluster"]["gpus_per_node"]
    proc = subprocess.run([sys.executable, "-c", DISPATCH, str(REPO_ROOT), json.dumps({"dtensor_cfg": dtensor, "world": world})],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HS3_UPSTREAM_DIR": str(nemo_rl_tree().parent)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_rm_policy_passes_nemo_rls_parallelize_dispatch_and_the_old_one_did_not(run_dir):
    """Finding 1. The v1 DTensor worker (our dtensor_cfg._v2 false, lm_policy.py:134-160) shards the reward
    model with _parallelize_model. The old plan (TP8, sequence_parallel on) falls back to the HF plan, which
    asserts `not sequence_parallel` (parallelize.py:715-717): the job died as its workers started. Ours
    (FSDP over 32 GPUs, TP1) is sharded."""
    ours = nemo_rl.nemo_rl_config(stage_cfg("rm", run_dir), rows=1000)
    assert ours["policy"]["dtensor_cfg"]["_v2"] is False and ours["policy"]["reward_model_cfg"]["enabled"]
    assert dispatch(ours) == {"ok": "FSDPLlamaForSequenceClassification", "sharded_over": 32}

    old = nemo_rl.nemo_rl_config(stage_cfg("rm", run_dir, "tp=8", "sp=true"), rows=1000)
    assert (old["policy"]["dtensor_cfg"]["tensor_parallel_size"], old["policy"]["dtensor_cfg"]["sequence_parallel"]) == (8, True)
    assert dispatch(old) == {"error": "AssertionError: sequence_parallel is not support in HF tp plan."}


def test_plan_refuses_what_nemo_rls_dtensor_worker_refuses(run_dir):
    """`plan` (and every render) rejects the old rm plan in one line, naming the rule's upstream source."""
    from recipes.config import ConfigError
    from recipes.megatron.plan import plan_from_cfg, validate_plan

    validate_plan(plan_from_cfg(stage_cfg("rm", run_dir)))
    validate_plan(plan_from_cfg(stage_cfg("rm", run_dir, "tp=8", "sp=false")))  # the HF-plan fallback: accepted
    with pytest.raises(ConfigError, match=r"sequence_parallel with TP 8: the reward model .*\(parallelize.py:700-717\)"):
        validate_plan(plan_from_cfg(stage_cfg("rm", run_dir, "tp=8", "sp=true")))
    with pytest.raises(ConfigError, match="sequence_parallel with TP 8"):
        nemo_rl.render(stage_cfg("rm", run_dir, "tp=8", "sp=true"))
    source_text = (nemo_rl_tree() / "nemo_rl/models/dtensor/parallelize.py").read_text().splitlines()
    assert "sequence_parallel is not support in HF tp plan." in source_text[715]  # line 716: the cited rule


def test_rm_is_handed_a_tokenizer_whose_pad_is_not_the_end_of_turn(run_dir):
    """Llama-3.3-70B-Instruct's tokenizer has no pad token; NeMo-RL's get_tokenizer then sets pad = eos =
    <|eot_id|> (algorithms/utils.py), and a sequence classifier reads its score at the last non-pad token,
    so the rm would learn to score one token before the <|eot_id|> where engine=hf, rl's reward and the
    eval read it. The job hands NeMo-RL the init tokenizer with engine=hf's distinct pad."""
    from transformers import AutoTokenizer

    from recipes.tiny_model import build_llama3_tokenizer

    init = run_dir / "sft" / "final"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (init / name).unlink(missing_ok=True)
    like_llama33 = build_llama3_tokenizer()
    assert like_llama33.pad_token is None and like_llama33.eos_token == "<|eot_id|>"
    like_llama33.save_pretrained(init)
    get_tokenizer = upstream_module("nemo_rl/algorithms/utils.py").get_tokenizer
    assert get_tokenizer({"name": str(init)}).pad_token == "<|eot_id|>"  # what NeMo-RL did with the old config

    cfg, _, ours = rendered_in_job("rm", run_dir)
    handed = get_tokenizer(ours["policy"]["tokenizer"])  # the rendered tokenizer section, as run_rm.py passes it
    assert handed.pad_token == "<|finetune_right_pad_id|>" and handed.pad_token_id != handed.eos_token_id
    assert handed.chat_template == AutoTokenizer.from_pretrained(init).chat_template  # "default": the model's own


# ---- NeMo-RL's config loading: our YAML over its example defaults -----------------------------------

def example_key_paths() -> set[str]:
    """Every dotted key path of every example config NeMo-RL ships at the pin (lists are leaves)."""
    paths: set[str] = set()

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                paths.add(prefix + str(key))
                walk(value, f"{prefix}{key}.")

    for path in (nemo_rl_tree() / "examples" / "configs").rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()) or {}, "")
    return paths


def leaf_paths(node, prefix="") -> list[str]:
    if isinstance(node, dict) and node:
        return [p for key, value in node.items() for p in leaf_paths(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


def load_as_nemo_rl_does(config_file: Path) -> dict:
    """examples/run_*.py: load_config (inheritance through `defaults`, utils/config.py:55-100), then
    OmegaConf.to_container(resolve=True); the resolvers NeMo-RL registers first (utils/config.py)."""
    from omegaconf import OmegaConf

    config = upstream_module("nemo_rl/utils/config.py")
    config.register_omegaconf_resolvers()
    return OmegaConf.to_container(config.load_config(str(config_file)), resolve=True)


def rendered_in_job(stage: str, run_dir: Path, *extra: str):
    """The YAML as the job leaves it for NeMo-RL (data hand-over written, policy source linked)."""
    cfg = stage_cfg(stage, run_dir, *extra)
    nemo_rl.render(cfg)
    counts = nemo_rl.prepare(cfg)
    return cfg, counts, yaml.safe_load(nemo_rl.config_path(cfg).read_text())


@pytest.mark.parametrize("stage", ["rm", "rl", "dpo"])
def test_every_key_we_render_exists_in_nemo_rls_configs(stage, run_dir):
    """Nothing we set is silently ignored: each key path of the rendered YAML is one of NeMo-RL's own (in
    the stage's example config or, for keys that one does not use, another example at the pin), and
    NeMo-RL's loader merges it over the example defaults without error."""
    cfg, _, ours = rendered_in_job(stage, run_dir)
    assert ours["defaults"] == str(nemo_rl_tree() / "examples" / "configs" / nemo_rl.EXAMPLE_CONFIG[stage])
    known = example_key_paths()
    unknown = [p for p in leaf_paths({k: v for k, v in ours.items() if k != "defaults"}) if p not in known]
    assert unknown == []
    merged = load_as_nemo_rl_does(nemo_rl.config_path(cfg))
    defaults = load_as_nemo_rl_does(Path(ours["defaults"]))
    assert set(merged) == set(defaults)  # no new top-level section


def test_rm_resolves_to_what_we_mean(run_dir):
    """Findings 1 and 6 as NeMo-RL reads them: the v1 worker without TP or SP, validation on the held-out
    slice of edit_quality/train (never pairs/validation), evaluated at least 4 times and at the end, a
    checkpoint at each evaluation, best by the slice's loss; the model's own chat template and our pad."""
    cfg, counts, _ = rendered_in_job("rm", run_dir)
    merged = load_as_nemo_rl_does(nemo_rl.config_path(cfg))
    policy, rm, checkpointing = merged["policy"], merged["rm"], merged["checkpointing"]
    assert policy["dtensor_cfg"]["_v2"] is False and policy["megatron_cfg"]["enabled"] is False
    assert (policy["dtensor_cfg"]["tensor_parallel_size"], policy["dtensor_cfg"]["sequence_parallel"]) == (1, False)
    assert policy["make_sequence_length_divisible_by"] == 1
    assert policy["tokenizer"] == {"name": str(nemo_rl.tokenizer_dir(cfg)), "chat_template": "default",
                                   "chat_template_kwargs": None}
    # 24 distinct prompts, 5% held out -> 2 (ceil); 22 training pairs at global batch 128 -> 1 step
    assert counts["selection"] == {"split": "edit_quality/train", "fraction": 0.05, "seed": cfg.seed, "prompts": 2, "pairs": 2}
    assert (counts["train"], counts["validation"]) == (22, 2)
    assert merged["data"]["validation"]["data_path"] == str(nemo_rl.data_path(cfg, "validation"))
    validation = [row["context"] for row in map(json.loads, Path(merged["data"]["validation"]["data_path"]).read_text().splitlines())]
    held_out = {json.dumps(p["prompt"]) for p in map(json.loads, (run_dir / "data/pairs/validation.jsonl").read_text().splitlines())}
    assert not {json.dumps(c) for c in validation} & held_out  # pairs/validation never chooses
    assert (rm["max_num_steps"], rm["max_num_epochs"], rm["val_period"], rm["val_at_end"], rm["val_at_start"]) == (1, 1, 1, True, False)
    assert rm["val_batches"] == -1 and checkpointing["save_period"] == rm["val_period"]
    assert (checkpointing["metric_name"], checkpointing["higher_is_better"]) == ("val:validation-default_loss", False)
    assert merged["logger"]["tensorboard_enabled"] is True and merged["logger"]["wandb_enabled"] is False


def test_rm_validation_cadence_gives_at_least_four_evaluations(run_dir):
    """Finding 6: at the paper's scale (~48 steps, val_period 50, val_at_end false) rm.yaml's defaults
    never validated, so "best" was the last step. Counted as NeMo-RL's rm_train decides (rm.py:545-548):
    a step validates when (step % val_period == 0) or (val_at_end and it is the last)."""
    for rows, steps in ((48 * 128, 48), (50 * 128, 50), (3 * 128, 3), (1000 * 128, 1000)):
        section = nemo_rl.nemo_rl_config(stage_cfg("rm", run_dir), rows=rows)["rm"]
        period = section["val_period"]
        validated = [s for s in range(1, steps + 1) if (period > 0 and s % period == 0) or (section["val_at_end"] and s == steps)]
        assert section["max_num_steps"] == steps and len(validated) >= min(4, steps) and validated[-1] == steps
    explicit = nemo_rl.nemo_rl_config(stage_cfg("rm", run_dir, "train.eval_steps=10"), rows=48 * 128)
    assert explicit["rm"]["val_period"] == 10 and explicit["checkpointing"]["save_period"] == 10


def test_rl_resolves_to_what_we_mean(run_dir):
    """RLOO as NeMo-RL reads it: leave-one-out baseline, no reward normalisation (also through the
    adv_estimator interpolations of grpo_math_1B.yaml), cut completions out of the loss as engine=hf's
    rl.mask_truncated_completions (finding 7), our step count (not 1000000), no validation on the eval's
    prompts, a reward-model environment on our rm."""
    cfg, counts, _ = rendered_in_job("rl", run_dir)
    merged = load_as_nemo_rl_does(nemo_rl.config_path(cfg))
    grpo = merged["grpo"]
    assert (grpo["use_leave_one_out_baseline"], grpo["normalize_rewards"]) == (True, False)
    assert (grpo["adv_estimator"]["use_leave_one_out_baseline"], grpo["adv_estimator"]["normalize_rewards"]) == (True, False)
    assert grpo["overlong_filtering"] is True
    assert merged["loss_fn"]["reference_policy_kl_penalty"] == cfg.rl.kl_coef
    assert (grpo["max_num_steps"], grpo["num_prompts_per_step"], grpo["num_generations_per_prompt"]) == (1, 32, 4)
    assert (grpo["val_period"], grpo["val_at_start"], grpo["val_at_end"], merged["data"]["validation"]) == (0, False, False, None)
    assert merged["checkpointing"]["metric_name"] is None
    assert merged["policy"]["generation"]["max_new_tokens"] == 2048 and merged["policy"]["generation"]["vllm_cfg"]["max_model_len"] == 4096
    assert merged["policy"]["megatron_cfg"]["tensor_model_parallel_size"] == 4
    assert merged["env"]["reward_model"]["model_name"] == str((run_dir / "rm" / "final").resolve())
    assert counts["train"] == 24 and counts["skipped_too_long"] == {"train": 0}
    off = load_as_nemo_rl_does(nemo_rl.config_path(rendered_in_job("rl", run_dir, "rl.mask_truncated_completions=false")[0]))
    assert off["grpo"]["overlong_filtering"] is False


def test_dpo_sets_every_key_we_mean(run_dir):
    """Finding 9: dpo.yaml's max_num_steps 150 and val_at_start true were inherited silently."""
    cfg, _, _ = rendered_in_job("dpo", run_dir, "train.epochs=3", "gbs=8", "dpo.beta=0.2")
    merged = load_as_nemo_rl_does(nemo_rl.config_path(cfg))
    dpo = merged["dpo"]
    assert (dpo["max_num_steps"], dpo["max_num_epochs"]) == (9, 3)  # 24 pairs / 8 = 3 steps per epoch
    assert (dpo["val_at_start"], dpo["val_at_end"], dpo["val_batches"], dpo["val_period"]) == (False, True, -1, 50)
    assert dpo["reference_policy_kl_penalty"] == 0.2 and dpo["sft_loss_weight"] == 0
    assert merged["policy"]["dtensor_cfg"]["enabled"] is False and merged["policy"]["megatron_cfg"]["enabled"] is True
    assert merged["data"]["validation"]["data_path"] == str(nemo_rl.data_path(cfg, "validation"))
    long = nemo_rl.nemo_rl_config(stage_cfg("dpo", run_dir), rows=200 * 128)["dpo"]
    assert long["max_num_steps"] == 200  # not dpo.yaml's 150


def test_report_to_becomes_nemo_rls_logger_config(run_dir, monkeypatch):
    """Finding 9: train.report_to was ignored (W&B hard-coded off). W&B's project and run name come from
    us; its credentials stay where the user's `wandb login` or WANDB_API_KEY put them."""
    monkeypatch.setenv("WANDB_API_KEY", "secret-not-to-be-written")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg, _, _ = rendered_in_job("rl", run_dir, "train.report_to=wandb")
    text = nemo_rl.config_path(cfg).read_text()
    logger = load_as_nemo_rl_does(nemo_rl.config_path(cfg))["logger"]
    assert (logger["wandb_enabled"], logger["tensorboard_enabled"]) == (True, False)
    assert logger["wandb"] == {"project": "helpsteer3-edit", "name": f"{run_dir.name}-rl"}
    assert "secret-not-to-be-written" not in text
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    both = nemo_rl.nemo_rl_config(stage_cfg("dpo", run_dir, "train.report_to=tensorboard,wandb"), rows=100)["logger"]
    assert (both["wandb_enabled"], both["tensorboard_enabled"], both["wandb"]["project"]) == (True, True, "mine")
    named = nemo_rl.nemo_rl_config(stage_cfg("rm", run_dir, "train.report_to=wandb", "train.wandb_project=p",
                                             "train.run_name=r"), rows=100)["logger"]["wandb"]
    assert named == {"project": "p", "name": "r"}  # the keys engine=hf uses (recipes/curves.py)
    none = nemo_rl.nemo_rl_config(stage_cfg("rm", run_dir, "train.report_to=none"), rows=100)["logger"]
    assert not none["wandb_enabled"] and not none["tensorboard_enabled"]


# ---- finding 8: the HF->Megatron conversion cache ---------------------------------------------------

def nemo_rl_cache_path(policy: dict) -> tuple[str, bool]:
    """NeMo-RL's validate_model_paths (models/megatron/setup.py:357-460) and get_megatron_checkpoint_dir
    (models/policy/utils.py:236-260), as pinned: (where the converted checkpoint is, whether NeMo-RL
    takes it as already converted and skips the conversion)."""
    utils = upstream_module("nemo_rl/models/policy/utils.py")
    namespace = upstream_functions(
        "nemo_rl/models/megatron/setup.py",
        ("validate_model_paths", "_resolve_iter_dir_from_root", "_get_hf_config_overrides_hash",
         "_canonicalize_hf_config_overrides"),
        {"os": os, "hashlib": __import__("hashlib"), "json": json, "get_megatron_checkpoint_dir": utils.get_megatron_checkpoint_dir})
    _, path, exists = namespace["validate_model_paths"](policy)
    return path, exists


def rebuild(final: Path, seed: int) -> None:
    """sft/final rewritten in place with other weights (a rerun of sft at the same path)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(final)


@pytest.mark.parametrize("stage", ["rl", "dpo"])
def test_a_rebuilt_sft_model_is_converted_again(stage, run_dir, monkeypatch):
    """Finding 8. NeMo-RL keys its HF->Megatron conversion by the model path and skips the conversion when
    that cache exists: with model_name = RUN/sft/final a rebuilt sft trained the stale model. We hand it
    OUT/policy_source/<content fingerprint>: same weights, same cache (no second conversion of a 70B);
    new weights, a new cache entry, so NeMo-RL converts again."""
    monkeypatch.setenv("HF_HOME", str(run_dir / "hf_home"))
    monkeypatch.delenv("NRL_MEGATRON_CHECKPOINT_DIR", raising=False)

    def policy_after_job_start() -> dict:
        return rendered_in_job(stage, run_dir)[2]["policy"]

    first = policy_after_job_start()
    path, exists = nemo_rl_cache_path(first)
    assert not exists and Path(first["model_name"]).resolve() == (run_dir / "sft" / "final").resolve()
    (Path(path) / "iter_0000000").mkdir(parents=True)  # PROBE of the GPU conversion: its output dir only
    again = policy_after_job_start()  # a requeued job, same sft/final
    assert nemo_rl_cache_path(again) == (path, True)

    rebuild(run_dir / "sft" / "final", seed=1)
    rebuilt = policy_after_job_start()
    new_path, new_exists = nemo_rl_cache_path(rebuilt)
    assert new_path != path and not new_exists  # NeMo-RL converts the new weights
    assert rebuilt["tokenizer"]["name"] == rebuilt["model_name"]

    # what the old rendering handed NeMo-RL: the path itself, found "converted" after the rebuild
    old = {**rebuilt, "model_name": str((run_dir / "sft" / "final").resolve())}
    (Path(nemo_rl_cache_path(old)[0]) / "iter_0000000").mkdir(parents=True)
    rebuild(run_dir / "sft" / "final", seed=2)
    assert nemo_rl_cache_path(old)[1] is True  # stale: the defect this replaces


# ---- finding 7: rl's length policy is engine=hf's ----------------------------------------------------

def test_rl_skips_and_counts_the_prompts_engine_hf_skips(run_dir, tiny_model_dir):
    """Prompts longer than train.seq_len - rl.max_new_tokens are skipped and counted by the same rule and
    token count as recipes/rl.py (TRL's RLOOTrainer built on the same data), not handed to NeMo-RL, whose
    processor would keep them at loss weight 0 and generate for them."""
    from recipes import rl

    lengths = sorted({len(row["prompt"][-1]["content"]) for row in map(json.loads, (run_dir / "data/prompts/train.jsonl").read_text().splitlines())})
    assert len(lengths) > 2  # the fixture's prompts differ in length
    base = ["parallel.nodes=1", "tp=1", "pp=1", "sp=false", "gbs=8", "mbs=1", "rl.prompts_per_step=2", "rl.k=4"]
    probe = rendered_in_job("rl", run_dir, *base, "train.seq_len=4096", "rl.max_new_tokens=16")[1]
    assert probe["skipped_too_long"] == {"train": 0}
    from recipes import training

    tokenizer = training.load_tokenizer(stage_cfg("rl", run_dir, *base))
    counts = training.token_lengths(tokenizer, [json.loads(line)["prompt"] for line in (run_dir / "data/prompts/train.jsonl").read_text().splitlines()],
                                    add_generation_prompt=True)
    seq_len = sorted(counts)[len(counts) // 2] + 16  # about half the prompts over seq_len - 16
    extra = [*base, f"train.seq_len={seq_len}", "rl.max_new_tokens=16"]
    cfg, handed, _ = rendered_in_job("rl", run_dir, *extra)
    hf = rl.build_trainer(compose("rl", [f"run_dir={run_dir / 'hf'}", f"data={run_dir / 'data'}", f"init={tiny_model_dir}",
                                         f"rm={tiny_model_dir}", "gbs=8", "mbs=2", "rl.prompts_per_step=2", "rl.k=4",
                                         f"train.seq_len={seq_len}", "rl.max_new_tokens=16"]))
    assert 0 < handed["skipped_too_long"]["train"] == hf.skipped_too_long["train"] < len(counts)
    sent = [json.loads(line)["messages"] for line in nemo_rl.data_path(cfg, "train").read_text().splitlines()]
    assert sent == list(hf.train_dataset["prompt"])
    summary_counts = handed  # what run_entry writes into summary.json
    assert summary_counts["prompt_limit"] == seq_len - 16
