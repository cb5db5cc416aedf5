"""The command line as a careless or hostile user types it (issue 18, items 5, 12, 13 and the empty
run_dir/out of item 4): every override either is refused with one line that names its key (exit 2,
before anything is loaded), or is accepted and survives exactly as typed. Run through compose()
in-process for speed, plus a handful through the real CLI (`python -m launcher`)."""
from __future__ import annotations

import math
import shutil

import pytest

from recipes.config import ConfigError, compose

from .conftest import REPO_ROOT, run_cli

# (stage, args, what the one-line error must name)
REFUSED = [
    # train
    ("sft", ["train.lr=0"], "train.lr=0"),
    ("sft", ["train.lr=-1e-5"], "train.lr=-1e-05"),
    ("sft", ["train.lr=inf"], "train.lr=inf"),
    ("sft", ["train.lr=nan"], "train.lr=nan"),
    ("sft", ["train.lr=2"], "train.lr=2"),
    ("sft", ["train.lr=fast"], "train.lr"),
    ("sft", ["train.epochs=0"], "train.epochs=0"),
    ("sft", ["train.epochs=inf"], "train.epochs=inf"),
    ("sft", ["train.epochs=nan"], "train.epochs=nan"),
    ("sft", ["train.epochs=-1"], "train.epochs=-1"),
    ("sft", ["train.max_steps=0"], "train.max_steps=0"),
    ("sft", ["train.max_steps=-2"], "train.max_steps=-2"),
    ("sft", ["train.max_steps=1e3"], "train.max_steps"),
    ("sft", ["train.global_batch=0"], "train.global_batch=0"),
    ("sft", ["gbs=-8"], "train.global_batch=-8"),
    ("sft", ["mbs=0"], "train.micro_batch=0"),
    ("sft", ["train.micro_batch=2.5"], "train.micro_batch"),
    ("sft", ["train.grad_accum=0"], "train.grad_accum=0"),
    ("sft", ["train.seq_len=0"], "train.seq_len=0"),
    ("sft", ["train.warmup_ratio=2"], "train.warmup_ratio=2"),
    ("sft", ["train.warmup_ratio=1"], "train.warmup_ratio=1"),
    ("sft", ["train.warmup_ratio=-0.1"], "train.warmup_ratio=-0.1"),
    ("sft", ["train.weight_decay=-1"], "train.weight_decay=-1"),
    ("sft", ["train.weight_decay=nan"], "train.weight_decay=nan"),
    ("sft", ["train.min_lr_ratio=5"], "train.min_lr_ratio=5"),
    ("sft", ["train.min_lr_ratio=-0.5"], "train.min_lr_ratio=-0.5"),
    ("sft", ["train.logging_steps=0"], "train.logging_steps=0"),
    ("sft", ["train.save_steps=0"], "train.save_steps=0"),
    ("sft", ["train.eval_steps=-1"], "train.eval_steps=-1"),
    ("sft", ["train.save_total_limit=0"], "train.save_total_limit=0"),
    ("sft", ["train.lr_scheduler=bogus"], "train.lr_scheduler=bogus"),
    ("sft", ["train.packing=maybe"], "train.packing=maybe"),
    ("sft", ["train.bf16=2"], "train.bf16=2"),
    ("sft", ["train.report_to=tensorbored"], "train.report_to=tensorbored"),
    ("sft", ["gbs=10", "mbs=4"], "train.global_batch=10"),
    ("sft", ["gbs=16", "mbs=2", "train.grad_accum=4"], "train.global_batch=16"),
    # peft
    ("sft", ["peft.r=0"], "peft.r=0"),
    ("sft", ["peft.r=-4"], "peft.r=-4"),
    ("sft", ["peft.alpha=0"], "peft.alpha=0"),
    ("sft", ["peft.dropout=1"], "peft.dropout=1"),
    ("sft", ["peft.dropout=-0.1"], "peft.dropout=-0.1"),
    ("sft", ["peft.target_modules=q_proj"], "peft.target_modules=q_proj"),
    ("sft", ["peft.enabled=true", "peft.target_modules=[]"], "peft.target_modules"),
    # model
    ("sft", ["model.dtype=fp8"], "model.dtype=fp8"),
    ("sft", ["model.num_layers=0"], "model.num_layers=0"),
    ("sft", ["model.hidden_size=-64"], "model.hidden_size=-64"),
    ("sft", ["model.vocab_size=0"], "model.vocab_size=0"),
    ("sft", ["model.max_position_embeddings=0"], "model.max_position_embeddings=0"),
    ("sft", ["model.attn_implementation=bogus"], "model.attn_implementation=bogus"),
    ("sft", ["model.path="], "model.path"),
    ("sft", ["model.path=/no/such/model/dir"], "model.path"),
    # run
    ("sft", ["seed=-1"], "seed=-1"),
    ("sft", ["seed=4294967296"], "seed=4294967296"),
    ("sft", ["seed=1.5"], "seed"),
    ("sft", ["run_dir="], "run_dir"),
    ("sft", ["run_dir=  "], "run_dir"),
    ("sft", ["out="], "out"),
    ("sft", ["data="], "data_dir"),
    ("sft", ["name="], "name"),
    ("sft", ["executor=k8s"], "executor=k8s"),
    ("sft", ["resume=/no/such/checkpoint"], "resume=/no/such/checkpoint"),
    ("sft", ["engine=jax"], "engine=jax"),
    ("sft", ["model=no_such_model"], "model=no_such_model"),
    ("sft", ["cluster=no_such_cluster"], "cluster=no_such_cluster"),
    ("sft", ["stage=rm"], "stage=rm"),
    ("sft", ["=5"], "'=5'"),
    ("sft", [" =x"], "' =x'"),
    ("sft", ["lr"], "'lr'"),
    ("sft", ["nonsense=1"], "nonsense"),
    ("sft", ["train.nonsense=1"], "train.nonsense"),
    ("sft", ["train=5"], "train"),
    ("sft", ["dry_run=perhaps"], "dry_run=perhaps"),
    # hf engine
    ("sft", ["hf.num_processes=0"], "hf.num_processes=0"),
    ("sft", ["hf.num_processes=-1"], "hf.num_processes=-1"),
    # parallel plan (ZeroDivisionError before)
    ("sft", ["tp=0"], "parallel.tp=0"),
    ("sft", ["pp=0"], "parallel.pp=0"),
    ("sft", ["cp=0"], "parallel.cp=0"),
    ("sft", ["engine=megatron", "tp=0"], "parallel.tp=0"),
    ("sft", ["engine=megatron", "pp=0"], "parallel.pp=0"),
    ("sft", ["vpp=0"], "parallel.vpp=0"),
    ("sft", ["parallel.mfu=0"], "parallel.mfu=0"),
    ("sft", ["parallel.mfu=2"], "parallel.mfu=2"),
    ("sft", ["parallel.nodes=0"], "parallel.nodes=0"),
    ("sft", ["parallel.gpus_per_node=-8"], "parallel.gpus_per_node=-8"),
    ("sft", ["parallel.peak_tflops=-1"], "parallel.peak_tflops=-1"),
    ("sft", ["parallel.gpu_memory_gb=inf"], "parallel.gpu_memory_gb=inf"),
    ("sft", ["sp=sometimes"], "parallel.sequence_parallel=sometimes"),
    # cluster
    ("sft", ["nodes=0"], "cluster.nodes=0"),
    ("sft", ["nodes=-1"], "cluster.nodes=-1"),
    ("sft", ["nodes=two"], "cluster.nodes"),
    ("sft", ["gpus_per_node=-1"], "cluster.gpus_per_node=-1"),
    ("sft", ["cluster.time=banana"], "cluster.time=banana"),
    ("sft", ["cluster.time=12h"], "cluster.time=12h"),
    ("sft", ["cluster.time=-5"], "cluster.time=-5"),
    ("sft", ["cluster.time=1:2:3:4"], "cluster.time=1:2:3:4"),
    ("sft", ["cluster.time="], "cluster.time="),
    ("sft", ["cluster.cpus_per_task=0"], "cluster.cpus_per_task=0"),
    ("sft", ["cluster.signal_seconds=-1"], "cluster.signal_seconds=-1"),
    ("sft", ["cluster.request_gpus=sometimes"], "cluster.request_gpus=sometimes"),
    ("sft", ["cluster.setup=module load cuda"], "cluster.setup=module load cuda"),
    # rm
    ("rm", ["rm.selection_fraction=1"], "rm.selection_fraction=1"),
    ("rm", ["rm.selection_fraction=-0.1"], "rm.selection_fraction=-0.1"),
    ("rm", ["rm.center_rewards_coefficient=nan"], "rm.center_rewards_coefficient=nan"),
    ("rm", ["rm.center_rewards_coefficient=inf"], "rm.center_rewards_coefficient=inf"),
    ("rm", ["rm.center_rewards_coefficient=-1"], "rm.center_rewards_coefficient=-1"),
    ("rm", ["rm.keep_best=true", "rm.selection_fraction=0"], "rm.keep_best"),
    # rl
    ("rl", ["rl.k=1"], "rl.k=1"),
    ("rl", ["rl.k=0"], "rl.k=0"),
    ("rl", ["rl.kl_coef=nan"], "rl.kl_coef=nan"),
    ("rl", ["rl.kl_coef=-0.1"], "rl.kl_coef=-0.1"),
    ("rl", ["rl.temperature=0"], "rl.temperature=0"),
    ("rl", ["rl.temperature=-1"], "rl.temperature=-1"),
    ("rl", ["rl.top_p=0"], "rl.top_p=0"),
    ("rl", ["rl.top_p=5"], "rl.top_p=5"),
    ("rl", ["rl.max_new_tokens=0"], "rl.max_new_tokens=0"),
    ("rl", ["rl.prompts_per_step=0"], "rl.prompts_per_step=0"),
    ("rl", ["rl.max_new_tokens=2048"], "rl.max_new_tokens=2048"),
    # dpo
    ("dpo", ["dpo.beta=0"], "dpo.beta=0"),
    ("dpo", ["dpo.beta=-1"], "dpo.beta=-1"),
    ("dpo", ["dpo.beta=nan"], "dpo.beta=nan"),
    ("dpo", ["dpo.loss_type=bogus"], "dpo.loss_type=bogus"),
    # eval
    ("eval", ["eval.max_rows=0"], "eval.max_rows=0"),
    ("eval", ["eval.max_rows=-5"], "eval.max_rows=-5"),
    ("eval", ["eval.batch_size=0"], "eval.batch_size=0"),
    ("eval", ["eval.temperature=-1"], "eval.temperature=-1"),
    ("eval", ["eval.top_p=0"], "eval.top_p=0"),
    ("eval", ["eval.top_p=5"], "eval.top_p=5"),
    ("eval", ["eval.concurrency=0"], "eval.concurrency=0"),
    ("eval", ["eval.bootstrap_samples=0"], "eval.bootstrap_samples=0"),
    ("eval", ["eval.bootstrap_samples=-100"], "eval.bootstrap_samples=-100"),
    ("eval", ["eval.near_copy_chrf=101"], "eval.near_copy_chrf=101"),
    ("eval", ["eval.request_timeout_s=0"], "eval.request_timeout_s=0"),
    ("eval", ["eval.max_retries=-1"], "eval.max_retries=-1"),
    ("eval", ["eval.max_new_tokens=0"], "eval.max_new_tokens=0"),
    ("eval", ["eval.max_prompt_tokens=0"], "eval.max_prompt_tokens=0"),
    ("eval", ["eval.gold_rm_kind=bogus"], "eval.gold_rm_kind=bogus"),
    ("eval", ["eval.gold_rm_input=bogus"], "eval.gold_rm_input=bogus"),
    ("eval", ["eval.task=bogus"], "eval.task=bogus"),
    ("eval", ["eval.gold_rm=/nope"], "eval.gold_rm=/nope"),
    # its
    ("its", ["its.max_prompts=0"], "its.max_prompts=0"),
    ("its", ["its.max_retries=-1"], "its.max_retries=-1"),
    ("its", ["its.responses=0"], "its.responses=0"),
    ("its", ["its.feedbacks=0"], "its.feedbacks=0"),
    ("its", ["its.edits=0"], "its.edits=0"),
    ("its", ["its.max_kept=0"], "its.max_kept=0"),
    ("its", ["its.concurrency=0"], "its.concurrency=0"),
    ("its", ["its.feedback_temperature=-1"], "its.feedback_temperature=-1"),
    ("its", ["its.response_temperature=-0.5"], "its.response_temperature=-0.5"),
    ("its", ["its.edit_temperature=nan"], "its.edit_temperature=nan"),
    ("its", ["its.top_p=0"], "its.top_p=0"),
    ("its", ["its.top_p=1.5"], "its.top_p=1.5"),
    ("its", ["its.feedback_pick=bogus"], "its.feedback_pick=bogus"),
    ("its", ["its.select_kind=bogus"], "its.select_kind=bogus"),
    ("its", ["its.memory_headroom=0.5"], "its.memory_headroom=0.5"),
    ("its", ["its.feedback_pick=keywords", "its.feedback_sets=2"], "its.feedback_sets=2"),
    # megatron
    ("sft", ["megatron.vllm_gpu_memory_utilization=0"], "megatron.vllm_gpu_memory_utilization=0"),
    ("sft", ["megatron.vllm_gpu_memory_utilization=1.5"], "megatron.vllm_gpu_memory_utilization=1.5"),
    ("sft", ["megatron.convert_direction=sideways"], "megatron.convert_direction=sideways"),
    ("sft", ["megatron.reward_model_nodes=0"], "megatron.reward_model_nodes=0"),
    ("sft", ["megatron.vllm_tp=0"], "megatron.vllm_tp=0"),
    # data prep
    ("data", ["prep.max_seq_len=0"], "prep.max_seq_len=0"),
    ("data", ["prep.feedback_targets=some"], "prep.feedback_targets=some"),
]

# (stage, args, key, the exact value it must have; for floats, also its type)
ACCEPTED = [
    ("sft", ["run_dir=/x/my run #2"], "run_dir", "/x/my run #2"),
    ("sft", ["run_dir=/x/my run #2"], "out", "/x/my run #2/sft"),
    ("sft", ["out=/tmp/a b/#c"], "out", "/tmp/a b/#c"),
    ("sft", ["name=entry #1"], "name", "entry #1"),
    ("sft", ["cluster.account=0123"], "cluster.account", "0123"),
    ("sft", ["cluster.time=12:00:00"], "cluster.time", "12:00:00"),
    ("sft", ["cluster.time=1-00:00:00"], "cluster.time", "1-00:00:00"),
    ("sft", ["cluster.time=90"], "cluster.time", "90"),
    ("sft", ["cluster.time=90:30"], "cluster.time", "90:30"),
    ("sft", ["cluster.time=2-12"], "cluster.time", "2-12"),
    ("sft", ["cluster.time=2-12:30"], "cluster.time", "2-12:30"),
    ("sft", ["cluster.partition=on"], "cluster.partition", "on"),
    ("sft", ["cluster.partition=yes"], "cluster.partition", "yes"),
    ("sft", ["cluster.partition=null"], "cluster.partition", None),
    ("sft", ["cluster.qos=~"], "cluster.qos", None),
    ("sft", ["cluster.mem=0"], "cluster.mem", "0"),
    ("sft", ["cluster.mem=64G"], "cluster.mem", "64G"),
    ("sft", ["model.name=1e3"], "model.name", "1e3"),
    ("sft", ["model.tokenizer=org/name"], "model.tokenizer", "org/name"),
    ("eval", ["eval.api_model=model:latest"], "eval.api_model", "model:latest"),
    ("eval", ["eval.judge_model=true"], "eval.judge_model", "true"),
    ("sft", ["cluster.extra_sbatch=[--exclusive,--mail-type=END]"], "cluster.extra_sbatch", ["--exclusive", "--mail-type=END"]),
    ("sft", ["cluster.container_mounts=[/lustre:/lustre]"], "cluster.container_mounts", ["/lustre:/lustre"]),
    ("sft", ["cluster.setup=[]"], "cluster.setup", []),
    ("sft", ["peft.target_modules=[q_proj,v_proj]"], "peft.target_modules", ["q_proj", "v_proj"]),
    ("sft", ["train.lr=1e-5"], "train.lr", 1e-5),
    ("sft", ["train.lr=1"], "train.lr", 1.0),
    ("sft", ["train.epochs=0.5"], "train.epochs", 0.5),
    ("sft", ["seed=0123"], "seed", 123),
    ("sft", ["seed=0"], "seed", 0),
    ("sft", ["seed=4294967295"], "seed", 4294967295),
    ("sft", ["train.max_steps=-1"], "train.max_steps", -1),
    ("sft", ["train.max_steps=1_000"], "train.max_steps", 1000),
    ("sft", ["train.warmup_ratio=0.99"], "train.warmup_ratio", 0.99),
    ("sft", ["train.min_lr_ratio=1"], "train.min_lr_ratio", 1.0),
    ("sft", ["train.weight_decay=0.1"], "train.weight_decay", 0.1),
    ("sft", ["train.grad_accum=null"], "train.grad_accum", None),
    ("sft", ["peft.enabled=true"], "peft.enabled", True),
    ("sft", ["peft.enabled=off"], "peft.enabled", False),
    ("sft", ["nodes=2"], "cluster.nodes", 2),
    ("sft", ["gpus_per_node=0"], "cluster.gpus_per_node", 0),
    ("sft", ["train.report_to=none"], "train.report_to", "none"),
    ("rl", ["rl.top_p=1"], "rl.top_p", 1.0),
    ("rl", ["rl.kl_coef=0"], "rl.kl_coef", 0.0),
    ("dpo", ["dpo.beta=1"], "dpo.beta", 1.0),
    ("rm", ["rm.center_rewards_coefficient=0.01"], "rm.center_rewards_coefficient", 0.01),
    ("eval", ["eval.temperature=0"], "eval.temperature", 0.0),
    ("eval", ["eval.max_rows=1"], "eval.max_rows", 1),
    ("eval", ["eval.gold_rm_kind=null"], "eval.gold_rm_kind", None),
    ("its", ["its.max_prompts=-1"], "its.max_prompts", -1),
    ("its", ["its.response_temperature=null"], "its.response_temperature", None),
    ("its", ["its.edit_temperature=0"], "its.edit_temperature", 0.0),
]


@pytest.mark.parametrize("stage, args, named", REFUSED, ids=[" ".join(c[1]) or "empty" for c in REFUSED])
def test_a_bad_value_is_one_line_naming_its_key(stage, args, named):
    with pytest.raises(ConfigError) as caught:
        compose(stage, args)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert named in message, f"{args}: the error does not name {named!r}: {message}"


@pytest.mark.parametrize("stage, args, key, expected", ACCEPTED, ids=[" ".join(c[1]) + f" {c[2]}" for c in ACCEPTED])
def test_an_accepted_value_survives_exactly(stage, args, key, expected):
    from omegaconf import OmegaConf

    value = OmegaConf.select(compose(stage, args), key)
    if isinstance(value, (list, tuple)) or hasattr(value, "_content"):
        value = list(value)
    assert value == expected and type(value) is type(expected), (args, key, value)
    if isinstance(expected, float):
        assert math.isfinite(value)


def test_there_are_at_least_120_cases():
    assert len(REFUSED) + len(ACCEPTED) >= 120


def test_a_cluster_file_keeps_slurm_times_and_strings_unquoted(conf_dir):
    """YAML 1.1 reads an unquoted 12:00:00 as the base-60 number 43200 (rendered --time=43200: 30 days),
    0123 as octal 83 and `on` as true; a config file means the strings."""
    (conf_dir / "cluster" / "mine.yaml").write_text(
        "cluster:\n  name: mine\n  time: 12:00:00\n  account: 0123\n  partition: on\n  qos: no\n"
        "  nodes: 2\n  gpus_per_node: 8\n  signal_seconds: 0600\n  container_mounts: [/a:/b]\n")
    cfg = compose("sft", ["cluster=mine", "model=tiny", "hf.num_processes=1"])
    assert (cfg.cluster.time, cfg.cluster.account, cfg.cluster.partition, cfg.cluster.qos) == ("12:00:00", "0123", "on", "no")
    assert (cfg.cluster.nodes, cfg.cluster.gpus_per_node, cfg.cluster.signal_seconds) == (2, 8, 600)
    assert list(cfg.cluster.container_mounts) == ["/a:/b"]


@pytest.mark.parametrize("content, named", [
    ("- a\n- b\n", "expected a mapping"),
    ("just a string\n", "expected a mapping"),
    ("cluster: {name: x\n", "cannot read"),
    ("cluster:\n  nodes: 1\n  nodes: 2\n", "duplicate key"),
    ("cluster:\n  nodes: 0\n", "cluster.nodes=0"),
    ("cluster:\n  time: banana\n", "cluster.time=banana"),
])
def test_a_broken_cluster_file_is_one_line(conf_dir, content, named):
    (conf_dir / "cluster" / "broken.yaml").write_text(content)
    with pytest.raises(ConfigError) as caught:
        compose("sft", ["cluster=broken"])
    assert named in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_through_the_real_cli_strings_reach_the_batch_script_as_typed(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO_ROOT / "conf", conf)
    (conf / "cluster" / "mine.yaml").write_text("cluster:\n  name: mine\n  time: 12:00:00\n  gpus_per_node: 1\n")
    run_dir = tmp_path / "my run #2"
    proc = run_cli("-m", "launcher", "sft", "executor=slurm", "cluster=mine", "model=tiny", "hf.num_processes=1",
                   "cluster.account=0123", "cluster.partition=on", f"run_dir={run_dir}", "--dry-run",
                   env={"HS3_CONF_DIR": str(conf)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line in ("#SBATCH --time=12:00:00", "#SBATCH --account=0123", "#SBATCH --partition=on"):
        assert line in lines, proc.stdout[:1500]
    assert str(run_dir) in proc.stdout


@pytest.mark.parametrize("args, named", [
    (["sft", "nodes=0"], "cluster.nodes=0"),
    (["sft", "engine=megatron", "tp=0"], "parallel.tp=0"),
    (["sft", "=5"], "'=5'"),
    (["rl", "rl.temperature=0"], "rl.temperature=0"),
    (["eval", "eval.gold_rm=/nope"], "eval.gold_rm=/nope"),
    (["sft", "run_dir="], "run_dir"),
])
def test_through_the_real_cli_a_bad_value_is_one_line_and_exit_2(args, named, tmp_path):
    proc = run_cli("-m", "launcher", *args, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert named in proc.stderr and "Traceback" not in proc.stderr
