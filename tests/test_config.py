"""Config composition: layer order, aliases, typed overrides, and one-line errors."""
from __future__ import annotations


import pytest

from recipes.config import ConfigError, compose, grad_accum_steps

from .conftest import run_cli


def test_layers_apply_in_order(conf_dir):
    (conf_dir / "model" / "layered.yaml").write_text(
        "base: tiny\n"
        "model: {name: layered}\n"
        "train: {lr: 0.5, seq_len: 77}\n"
        "stages:\n  sft: {train: {lr: 0.25}}\n  rm: {train: {lr: 0.125}}\n"
    )
    (conf_dir / "cluster" / "big.yaml").write_text("cluster: {name: big, nodes: 2, gpus_per_node: 8}\n")
    cfg = compose("sft", ["model=layered", "cluster=big", "train.seq_len=99", "hf.num_processes=2", "gbs=8"])
    assert cfg.model.name == "layered"
    assert cfg.model.hidden_size == 64  # inherited through `base: tiny`
    assert cfg.train.lr == 0.25  # the model file's per-stage block beats its general block
    assert cfg.train.seq_len == 99  # the command line beats every file
    assert cfg.cluster.nodes == 2
    assert compose("rm", ["model=layered"]).train.lr == 0.125
    assert compose("dpo", ["model=layered"]).train.lr == 0.5


def test_aliases_and_interpolation():
    cfg = compose("rl", ["run_dir=/x/run", "tp=4", "pp=2", "gbs=16", "mbs=4", "nodes=1", "rm=/ckpt/rm", "data=/d"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (4, 2)
    assert (cfg.train.global_batch, cfg.train.micro_batch) == (16, 4)
    assert cfg.reward_model == "/ckpt/rm"
    assert cfg.data_dir == "/d"
    assert cfg.out == "/x/run/rl"
    assert cfg.init == "/x/run/sft/final"  # rl starts from the sft checkpoint by default
    assert grad_accum_steps(cfg) == 4


def test_model_accepts_a_checkpoint_path(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a dir without one is refused (tests/test_config_gaps.py)
    cfg = compose("eval", [f"model={tmp_path}"])
    assert cfg.model.path == str(tmp_path)
    assert cfg.model.name == tmp_path.name


def test_list_values_parse():
    cfg = compose("sft", ["peft.target_modules=[q_proj,v_proj]", "peft.enabled=true"])
    assert list(cfg.peft.target_modules) == ["q_proj", "v_proj"]
    assert cfg.peft.enabled is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["nonsense=1"], "unknown key nonsense"),
        (["train.nonsense=1"], "unknown key train.nonsense"),
        (["train.lr=fast"], "train.lr: Value 'fast'"),
        (["cluster.nodes=two"], "cluster.nodes: Value 'two'"),
        (["model=no_such_model"], "model=no_such_model: no such file"),
        (["engine=jax"], "engine=jax: unknown engine"),
        (["executor=k8s"], "executor=k8s: not one of local, slurm"),
        (["model.dtype=fp8"], "model.dtype=fp8: not one of float32, bfloat16, float16"),
        (["gbs=10", "mbs=4"], "train.global_batch=10 is not divisible by train.micro_batch=4 x data-parallel size=1 (= 4)"),
        (["gbs=16", "mbs=2", "hf.num_processes=3"], "train.micro_batch=2 x data-parallel size=3 (= 6)"),
        (["gbs=16", "mbs=2", "train.grad_accum=4"], "train.global_batch=16 != train.micro_batch=2 x data-parallel size=1 x train.grad_accum=4 (= 8)"),
        (["positional"], "expected key=value, got 'positional'"),
    ],
)
def test_bad_config_is_one_clear_error(args, message):
    with pytest.raises(ConfigError) as err:
        compose("sft", args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_rloo_needs_two_rollouts():
    with pytest.raises(ConfigError, match=r"rl.k=1 must be >= 2"):
        compose("rl", ["rl.k=1"])


def test_cli_error_is_one_line_without_traceback():
    proc = run_cli("-m", "launcher", "sft", "train.lr=fast", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: train.lr:")
    assert "Traceback" not in proc.stderr


def test_cli_unknown_command():
    proc = run_cli("-m", "launcher", "train", timeout=120)
    assert proc.returncode == 2
    assert "unknown command 'train'" in proc.stderr


def test_config_errors_do_not_import_torch():
    """Config mistakes must be reported before any heavy import (let alone a model load)."""
    proc = run_cli("-c", "import sys\nfrom launcher.__main__ import main\nrc = main(['sft', 'gbs=3'])\n"
                   "print(rc, 'torch' in sys.modules)", timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr


def test_default_model_follows_engine_and_executor():
    assert compose("sft", []).model.name == "tiny"
    assert compose("sft", ["engine=megatron"]).model.name == "llama33_70b"
    assert compose("sft", ["executor=slurm", "cluster=example"]).model.name == "llama33_70b"
    assert compose("sft", ["executor=slurm", "cluster=example", "model=tiny", "hf.num_processes=1", "nodes=1"]).model.name == "tiny"


def test_convert_defaults_to_the_megatron_engine():
    assert compose("convert", []).engine == "megatron"
    from launcher.__main__ import run_stage
    from hs3.io import UserError

    with pytest.raises(UserError, match="stage convert has no hf engine"):
        run_stage(compose("convert", ["engine=hf"]))
