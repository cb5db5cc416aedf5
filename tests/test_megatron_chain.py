"""The Megatron engine as a chain of jobs that can actually run: the pipeline's graph and hand-overs, the
conversion destination, and the in-container wrappers run for real against the pinned upstream code
where it runs on CPU (NeMo-RL's message formatting, processor registry and TimeoutChecker; Megatron-Bridge's
output-directory check), and against PROBES where it cannot (tests/megatron_probe: a stand-in for
megatron.bridge; probe scripts at NeMo-RL's entry point and converter paths). Upstream files and lines
are cited at each check (tests/upstream.toml: Megatron-Bridge 0.6.2 wheel and commit 51885cf, NeMo-RL v0.7.0
81aa43d). Megatron-Bridge's sft wrapper: tests/test_mb_upstream.py; conversions: tests/test_megatron_convert.py."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipes.config import REPO_ROOT, compose
from recipes.megatron import bridge_sft, convert, nemo_rl
from launcher.pipeline import stage_args
from recipes.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER_FILE
from tests import upstream
from tests.conftest import run_cli

CONVERSATION = [
    {"role": "user", "content": "Write a haiku about rain."},
    {"role": "assistant", "content": "Rain falls."},
    {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\nToo short."},
]


def pinned(name: str, path: str) -> str:
    """A file of tests/upstream.toml's NAME git tree (skips, naming the fetch script, when it is absent)."""
    return (upstream.source(name, "git") / path).read_text()


@pytest.fixture(scope="session")
def nemo_rl_src(tmp_path_factory) -> Path:
    """A directory holding only NeMo-RL's `nemo_rl` package at the pin (tests/upstream.toml; its pure-Python
    parts import on CPU), to put on a path: the tree's own `tests` package must not shadow ours."""
    package = upstream.source("nemo_rl", "git") / "nemo_rl"
    root = tmp_path_factory.mktemp("nemo_rl_pinned")
    (root / "nemo_rl").symlink_to(package, target_is_directory=True)
    return root


def write_data(run_dir: Path, n_train: int = 5) -> None:
    data = run_dir / "data"
    for split, n in (("train", n_train), ("validation", 1)):
        rows = {
            "sft": [{"messages": CONVERSATION + [{"role": "assistant", "content": f"Rain falls, {i}."}]} for i in range(n)],
            "pairs": [{"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "good"}],
                       "rejected": [{"role": "assistant", "content": "bad"}]} for _ in range(n)],
            "prompts": [{"prompt": CONVERSATION, "reference_edit": "Rain falls softly."} for _ in range(n)],
        }
        for folder, items in rows.items():
            (data / folder).mkdir(parents=True, exist_ok=True)
            (data / folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def chain_cfgs(run_dir: Path, *extra: str, preset: str = "default") -> dict:
    chain, args, _ = stage_args(preset, ["engine=megatron", f"run_dir={run_dir}", "executor=slurm", "cluster=example", *extra])
    return {name: compose(entry.stage, args[name]) for name, entry in chain.items()}


# ---- the 70B chain ---------------------------------------------------------------------------------

def test_megatron_pipeline_dry_run_on_an_empty_run_dir_shows_every_job(tmp_path):
    """import -> sft -> export -> rm -> export (HF) -> rl -> export -> eval, chained with afterok, rendered
    before any data exists (a dry run, like a submission, must not read what an earlier job writes)."""
    run_dir = tmp_path / "run"
    proc = run_cli("-m", "launcher", "pipeline", "engine=megatron", "executor=slurm", "cluster=example",
                   f"run_dir={run_dir}", "--dry-run", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = re.findall(r"^# ---- (\w+): sbatch --parsable(?: --dependency=afterok:(\S+))? (\S+)$", proc.stdout, re.M)
    assert [(name, after) for name, after, _ in jobs] == [
        ("data", ""), ("import", ""), ("sft", "$DATA_JOB:$IMPORT_JOB"), ("sft_export", "$SFT_JOB"),
        ("rm", "$SFT_EXPORT_JOB"), ("rm_export", "$RM_JOB"), ("rl", "$SFT_EXPORT_JOB:$RM_EXPORT_JOB"),
        ("rl_export", "$RL_JOB"), ("eval", "$RL_EXPORT_JOB")]
    assert all(script == f"{run_dir.resolve()}/slurm/{name}.sbatch" for name, _, script in jobs)
    assert not (run_dir / "data").exists() and not (run_dir / "jobs.json").exists()
    dpo = run_cli("-m", "launcher", "pipeline", "engine=megatron", "preset=megatron_dpo", "executor=slurm",
                  "cluster=example", f"run_dir={tmp_path / 'dpo'}", "--dry-run", timeout=300)
    assert dpo.returncode == 0, dpo.stderr[-2000:]
    assert re.findall(r"^# ---- (\w+):", dpo.stdout, re.M) == ["data", "import", "sft", "sft_export", "dpo",
                                                               "dpo_export", "eval"]


def test_every_hand_over_in_the_chain_is_what_the_producer_writes(tmp_path):
    """Each job's input path is exactly its producer's output: sft starts from the import's Megatron
    checkpoint; the exports write HF dirs at sft/final, rm/final, rl/final, which rm, rl and eval read."""
    cfgs = chain_cfgs(tmp_path)
    run = tmp_path.resolve()

    def arg(command, flag):
        return command[command.index(flag) + 1]

    imported = convert.build_command(cfgs["import"])
    assert arg(imported, "--megatron-path") == bridge_sft.pretrained_checkpoint(cfgs["sft"]) == str(run / "import" / "converted")
    sft_export = convert.build_command(cfgs["sft_export"])
    assert arg(sft_export, "--megatron-path") == str(run / "sft" / "checkpoints")  # checkpoint.save of sft
    assert f"checkpoint.save={run / 'sft' / 'checkpoints'}" in bridge_sft.bridge_config(cfgs["sft"], 10)["overrides"]
    assert arg(sft_export, "--hf-path") == str(run / "sft" / "final")
    for stage in ("rm", "rl"):
        assert nemo_rl._policy_source(cfgs[stage]) == str(run / "sft" / "final")
        document = nemo_rl.nemo_rl_config(cfgs[stage], rows=64)
        export = convert.build_command(cfgs[f"{stage}_export"])
        assert arg(export, "--checkpoints") == document["checkpointing"]["checkpoint_dir"] == str(run / stage / "checkpoints")
        assert arg(export, "--dest") == str(run / stage / "final")
    assert arg(convert.build_command(cfgs["rm_export"]), "--select") == "best"
    assert nemo_rl.nemo_rl_config(cfgs["rl"], rows=64)["env"]["reward_model"]["model_name"] == str(run / "rm" / "final")
    assert Path(cfgs["eval"].init).resolve() == run / "rl" / "final"
    # NeMo-RL's converters run in NeMo-RL's container; Megatron-Bridge's in Megatron-Bridge's
    from launcher.slurm import container_image

    assert container_image(cfgs["rm_export"]) == cfgs["rm_export"].megatron.nemo_rl_container
    assert container_image(cfgs["import"]) == container_image(cfgs["sft_export"]) == cfgs["import"].megatron.container
    assert cfgs["import"].megatron.container.endswith("megatron-bridge-0.6.2-pytorch26.06.sqsh")


# ---- convert: the destination stays empty ----------------------------------------------------------

def test_convert_destination_is_empty_when_megatron_bridge_gets_it(tmp_path):
    """Megatron-Bridge refuses a non-empty destination (scripts/conversion/utils.py:135-156,
    "Destination is not empty"): run its own check, from the pinned source, on what convert renders."""
    source = pinned("megatron_bridge", "scripts/conversion/utils.py")
    assert 'raise FileExistsError(f"Destination is not empty: {output_path}. Pass --overwrite to replace it.")' in source
    module_file = tmp_path / "mb_conversion_utils.py"
    module_file.write_text(source)
    spec = importlib.util.spec_from_file_location("mb_conversion_utils", module_file)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)

    cfgs = chain_cfgs(tmp_path / "run")
    for name in ("import", "sft_export", "rm_export", "rl_export"):
        cfg = cfgs[name]
        files = convert.render(cfg)  # what the job's command reads, written when it is submitted
        dest = convert.destination(cfg)
        assert {Path(f).parent for f in files} == {Path(cfg.out).resolve()} and Path(cfg.out).resolve() != dest
        assert not dest.exists() or not any(dest.iterdir())
        assert utils.prepare_output_directory(str(dest), overwrite=False) == dest  # Megatron-Bridge accepts it
        # the old layout, destination = the stage's own dir with config.yaml and command.sh in it, is refused
        with pytest.raises(FileExistsError, match="Destination is not empty"):
            utils.prepare_output_directory(cfg.out, overwrite=False)


def test_nemo_rl_export_picks_the_step_and_the_converter(tmp_path):
    """NeMo-RL's layout: checkpoint_dir/step_N/{config.yaml, training_info.json, policy/weights}
    (utils/checkpoint.py:110-127); best = lowest/highest metric_name in training_info, steps without
    it skipped, none with it -> latest (checkpoint.py:315-353); DTensor weights are DCP
    (convert_dcp_to_hf.py), Megatron weights hold iter_* dirs (models/megatron/setup.py:325-352)."""
    ckpts = tmp_path / "rm" / "checkpoints"
    for step, loss in ((2, 0.7), (4, 0.5), (6, 0.6), (8, None)):
        d = ckpts / f"step_{step}"
        (d / "policy" / "weights").mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"checkpointing": {"metric_name": "val:loss", "higher_is_better": False},
                                                       "policy": {"megatron_cfg": {"enabled": False}}}))
        (d / "training_info.json").write_text(json.dumps({"step": step, **({"val:loss": loss} if loss else {})}))
    (ckpts / "tmp_step_10").mkdir()  # unfinished: not a checkpoint (checkpoint.py:364-367)
    assert convert.select_step(ckpts, "best").name == "step_4"
    assert convert.select_step(ckpts, "latest").name == "step_8"
    command = convert.converter_command(ckpts / "step_4", tmp_path / "rm" / "final", Path("/opt/nemo-rl/examples/converters"))
    assert command == ["python", "/opt/nemo-rl/examples/converters/convert_dcp_to_hf.py", "--config",
                       str(ckpts / "step_4" / "config.yaml"), "--dcp-ckpt-path", str(ckpts / "step_4" / "policy" / "weights"),
                       "--hf-ckpt-path", str(tmp_path / "rm" / "final")]
    step = tmp_path / "rl" / "checkpoints" / "step_3"
    (step / "policy" / "weights" / "iter_0000000").mkdir(parents=True)
    (step / "config.yaml").write_text(yaml.safe_dump({"policy": {"megatron_cfg": {"enabled": True}}}))
    assert convert.converter_command(step, tmp_path / "out", Path("/c"))[:6] == [
        convert.MCORE_PYTHON, "/c/convert_megatron_to_hf.py", "--config", str(step / "config.yaml"), "--megatron-ckpt-path",
        str(step / "policy" / "weights" / "iter_0000000")]
    # the real flags of NeMo-RL's converters
    for script, flags in (("convert_dcp_to_hf.py", ("--config", "--dcp-ckpt-path", "--hf-ckpt-path")),
                          ("convert_megatron_to_hf.py", ("--config", "--megatron-ckpt-path", "--hf-ckpt-path"))):
        source = pinned("nemo_rl", f"examples/converters/{script}")
        assert all(f'"{flag}"' in source for flag in flags)

    # the wrapper itself, run as the job runs it, against a probe at the converter's path
    converters = tmp_path / "converters"
    converters.mkdir()
    (converters / "convert_dcp_to_hf.py").write_text(
        "# PROBE of NeMo-RL's converter: records its argv\nimport json, sys\n"
        f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    proc = run_cli("-m", "recipes.megatron.convert", "--checkpoints", str(ckpts), "--dest", str(tmp_path / "rm" / "final"),
                   "--converters", str(converters), "--select", "best", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "argv.json").read_text()) == command[2:]
    empty = run_cli("-m", "recipes.megatron.convert", "--checkpoints", str(tmp_path / "none"), "--dest", str(tmp_path / "x"),
                    "--converters", str(converters), timeout=120)
    assert empty.returncode == 2 and "no NeMo-RL step_N checkpoint" in empty.stderr


# ---- NeMo-RL stages in the container: data hand-over, processor, stopping early ---------------------

def test_rl_reward_model_sees_the_conversation_as_rm_training_formatted_it(nemo_rl_src, tiny_model_dir, monkeypatch):
    """Our rl processor's message_log, plus the generated edit as NeMo-RL appends it (rollouts.py:276-281),
    formatted by the reward-model environment (reward_model_environment.py:202-211) gives the same tokens
    as the rm stage's training pair (preference_preprocessor, processors.py:265-272): one message per turn."""
    monkeypatch.syspath_prepend(str(nemo_rl_src))
    from transformers import AutoTokenizer

    from nemo_rl.data.interfaces import TaskDataSpec
    from nemo_rl.data.llm_message_utils import get_formatted_message_log
    from nemo_rl.data.processors import preference_preprocessor

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = TaskDataSpec(task_name="edit")
    datum = {"messages": CONVERSATION, "reference_edit": "x", "task_name": "edit"}
    out = nemo_rl.edit_prompt_processor(datum, spec, tokenizer, max_seq_length=4096, idx=3)
    assert [m["role"] for m in out["message_log"]] == ["user", "assistant", "user"]
    assert [m["content"] for m in out["message_log"]] == [m["content"] for m in CONVERSATION]  # raw text per turn
    prompt_ids = [int(t) for m in out["message_log"] for t in m["token_ids"]]
    assert prompt_ids == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True),
                                   add_special_tokens=False)["input_ids"]  # the policy's prompt
    assert out["length"] == len(prompt_ids) and out["loss_multiplier"] == 1.0

    edit = "Rain falls softly on the roof."
    rollout = [{"role": m["role"], "content": m["content"]} for m in out["message_log"]] + [{"role": "assistant", "content": edit}]
    scored = get_formatted_message_log(rollout, tokenizer=tokenizer, task_data_spec=spec, add_bos_token=True,
                                       add_eos_token=True, add_generation_prompt=False)
    pair = nemo_rl.preference_row({"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": edit}],
                                   "rejected": [{"role": "assistant", "content": "no"}]}, Path("x"), 1)
    trained = preference_preprocessor(pair, spec, tokenizer, max_seq_length=4096, idx=0)["message_log_chosen"]
    assert [int(t) for m in scored for t in m["token_ids"]] == [int(t) for m in trained for t in m["token_ids"]]

    short = nemo_rl.edit_prompt_processor(datum, spec, tokenizer, max_seq_length=8, idx=3)
    assert short["loss_multiplier"] == 0.0 and short["length"] <= 8


ENTRY_PROBE = """# PROBE at NeMo-RL's entry point: records argv and what the wrapper prepared, then runs like
# rm_train's loop with NeMo-RL's own TimeoutChecker (rm.py:462-466, 585, 702-704)
import json, os, sys, types
from pathlib import Path
import yaml
import nemo_rl.utils.timer as timer_module
from nemo_rl.utils.timer import TimeoutChecker
clock = [1000.0]  # simulated time: each training step takes 100 s
timer_module.time = types.SimpleNamespace(time=lambda: clock[0])
doc = yaml.safe_load(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
record = {"argv": sys.argv, "train_rows": len(Path(doc["data"]["train"]["data_path"]).read_text().splitlines()),
          "scheduler": doc["policy"].get("scheduler"), "must_save_by": doc["checkpointing"]["checkpoint_must_save_by"]}
try:
    from nemo_rl.data.processors import PROCESSOR_REGISTRY
    record["processors"] = sorted(PROCESSOR_REGISTRY)
except ImportError:
    pass
timeout = TimeoutChecker(timeout=doc["checkpointing"]["checkpoint_must_save_by"], fit_last_save_time=True)
timeout.start_iterations()
for step in range(3 if "complete" in os.environ.get("PROBE_CASE", "") else 5):
    if timeout.check_save():
        record["stopped_at"] = step
        print("Timeout has been reached, stopping training early", flush=True)
        break
    if os.environ.get("PROBE_USR1_AT") == str(step):  # the batch script's USR1 trap
        Path(os.environ["PROBE_OUT"], "PREEMPT_REQUEST").touch()
    clock[0] += 100
Path(os.environ["PROBE_RECORD"]).write_text(json.dumps(record))
"""


@pytest.mark.parametrize("case", ["complete", "time_limit", "usr1"])
def test_nemo_rl_wrapper_hands_over_data_and_requeues_an_early_stop(case, nemo_rl_src, tmp_path, tiny_model_dir):
    import shutil

    write_data(tmp_path, n_train=48)
    shutil.copytree(tiny_model_dir, tmp_path / "sft" / "final")  # the init model: its tokenizer counts tokens in the job
    # the probe's steps take 100 s of (simulated) time: a 6-minute job with USR1 240 s before its end
    # must save by 120 s (setup_minutes=0 here), i.e. at its 3rd step
    time_limit = {"time_limit": "00:06:00", "complete": "04:00:00", "usr1": "04:00:00"}[case]
    stage = "rm" if case != "usr1" else "rl"
    extra = ["parallel.nodes=1", "tp=1", "pp=1", "sp=false", "gbs=16", "mbs=1", "executor=slurm", "cluster=example", f"cluster.time={time_limit}",
             "cluster.signal_seconds=240", "megatron.setup_minutes=0", "rl.prompts_per_step=2",
             f"megatron.nemo_rl_dir={tmp_path / 'nemo-rl'}"]
    if stage == "rm":  # one prompt in this data: no selection slice (test_nemo_rl_upstream.py checks that)
        extra += ["parallel.fsdp=true", "train.warmup_ratio=0.5", "rm.selection_fraction=0", "rm.keep_best=false"]
    cfg = compose(stage, ["engine=megatron", f"run_dir={tmp_path}", *extra])
    nemo_rl.render(cfg)
    assert not (tmp_path / stage / "data").exists()  # submission reads no data
    entry = tmp_path / "nemo-rl" / nemo_rl.ENTRY_POINT[stage]
    entry.parent.mkdir(parents=True)
    entry.write_text(ENTRY_PROBE)
    command = nemo_rl.build_command(cfg)
    assert command[:3] == ["python", "-m", "recipes.megatron.nemo_rl"] and str(entry) in command
    env = {**os.environ, "PYTHONPATH": f"{nemo_rl_src}{os.pathsep}{REPO_ROOT}", "PROBE_RECORD": str(tmp_path / "record.json"),
           "PROBE_OUT": str(tmp_path / stage), "PROBE_CASE": case}
    if case == "usr1":
        env["PROBE_USR1_AT"] = "0"
    proc = subprocess.run([sys.executable, *command[1:]], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["argv"] == [str(entry), "--config", str(nemo_rl.config_path(cfg))]
    assert record["train_rows"] == 48  # the wrapper wrote the hand-over before NeMo-RL started
    if stage == "rl":
        assert nemo_rl.EDIT_PROCESSOR in record["processors"]
    if case == "complete":
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert record["must_save_by"] == "00:03:56:00" and "stopped_at" not in record  # 4 h - 240 s, setup 0
        # warmup 50% of 48 rows / gbs 16 = 3 steps -> 2 steps LinearLR, then cosine, chained at 2 (dpo.yaml:112-122 form)
        assert record["scheduler"][-1] == {"milestones": [2]}
        assert json.loads((tmp_path / stage / "summary.json").read_text())["stage"] == "rm"
    else:
        assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-2000:]
        assert record["stopped_at"] == (2 if case == "time_limit" else 1)
        assert record["must_save_by"] == ("00:00:02:00" if case == "time_limit" else "00:03:56:00")
        assert (tmp_path / stage / PREEMPTED_MARKER_FILE).exists() and not (tmp_path / stage / "summary.json").exists()


def test_rm_schedule_runs_as_nemo_rl_builds_it():
    """The DTensor worker builds torch schedulers from policy.scheduler and chains them with SequentialLR
    at `milestones` (dtensor_policy_worker.py:470-493): warmup from ~0 to lr, cosine down to lr x min_lr_ratio."""
    import torch

    cfg = compose("rm", ["engine=megatron", "parallel.nodes=1", "tp=1", "parallel.fsdp=true", "train.lr=1e-3",
                         "train.warmup_ratio=0.1", "train.min_lr_ratio=0.1", "train.lr_scheduler=cosine"])
    schedule = nemo_rl.torch_scheduler(cfg, steps=100)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedulers, milestones = [], []
    for item in schedule:  # as dtensor_policy_worker.py:477-490
        if "name" in item:
            module, _, name = item["name"].rpartition(".")
            schedulers.append(getattr(__import__(module, fromlist=[name]), name)(optimizer, **item["kwargs"]))
        else:
            milestones = item["milestones"]
    sequential = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers, milestones)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sequential.step()
    assert lrs[0] < 1e-9 and max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 10
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_checkpoint_must_save_by_follows_the_slurm_time_limit(nemo_rl_src, monkeypatch):
    monkeypatch.syspath_prepend(str(nemo_rl_src))
    from nemo_rl.utils.timer import convert_to_seconds  # timer.py:251, 'DD:HH:MM:SS'

    cfg = compose("rm", ["engine=megatron", "executor=slurm", "cluster=example", "cluster.time=1-02:00:00"])
    value = nemo_rl.nemo_rl_config(cfg, rows=100)["checkpointing"]["checkpoint_must_save_by"]
    assert convert_to_seconds(value) == 26 * 3600 - cfg.cluster.signal_seconds - nemo_rl.setup_seconds(cfg)
    assert nemo_rl.nemo_rl_config(compose("rm", ["engine=megatron"]), rows=100)["checkpointing"]["checkpoint_must_save_by"] is None


def test_plan_prints_the_pinned_container():
    proc = run_cli("-m", "launcher", "plan", "model=llama33_70b", timeout=120, env={**os.environ, "HS3_CONTAINER_DIR": "/images"})
    assert proc.returncode == 0, proc.stderr
    assert "container: /images/megatron-bridge-0.6.2-pytorch26.06.sqsh (Megatron-Bridge 0.6.2, 51885cf)" in proc.stdout
    # why not NeMo Framework 26.06: it ships Megatron-Bridge 0.5.0 (docs/releases/software-versions.md)
    versions = pinned("megatron_bridge", "docs/releases/software-versions.md")
    nemo_2606 = versions.split("## NeMo Framework 26.06")[1].split("## ")[0]
    assert "| Megatron-Bridge | 0.5.0 |" in nemo_2606 and "| Megatron Core | 0.18.0 |" in nemo_2606


def test_submitting_the_megatron_chain_needs_hf_token(tmp_path):
    """Jobs run with --no-container-mount-home (no ~/.cache/huggingface/token): without HF_TOKEN in the
    environment sbatch hands the jobs, the gated base model cannot be downloaded; refuse before submitting."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    args = ("-m", "launcher", "pipeline", "engine=megatron", "executor=slurm", "cluster=example", f"run_dir={tmp_path}")

    def run(*extra):
        return subprocess.run([sys.executable, *args, *extra], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    refused = run()
    assert refused.returncode == 2 and not (tmp_path / "jobs.json").exists()
    assert refused.stderr.strip().startswith("error: HF_TOKEN is not set: the jobs download meta-llama/Llama-3.3-70B-Instruct")
    warned = run("--dry-run")
    assert warned.returncode == 0 and "# warning: HF_TOKEN is not set" in warned.stdout
