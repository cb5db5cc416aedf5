"""Help, the resolved config, config files and "did you mean" (issue 19 items 1 and 2):
`./launch.sh STAGE --help`, `./launch.sh config STAGE [--only SECTION] [--diff]`, `--config FILE.yaml`
(a saved OUT/config.yaml reruns its stage byte for byte), and conf/examples/."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from launcher.help import section_fields, sections_for, stage_help
from recipes.config import STAGES, ConfigError, compose, to_yaml

from .conftest import REPO_ROOT, SAMPLE_DIR, run_cli


def launcher(*args, timeout=300):
    return run_cli("-m", "launcher", *map(str, args), timeout=timeout)


# ---- STAGE --help ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_help_lists_every_key_of_the_stage_with_type_value_and_doc(stage):
    text = stage_help(stage, [])
    cfg = compose(stage, [])
    titles = re.findall(r"^\[(\w+)\]", text, flags=re.M)
    assert titles == ["run" if s is None else s for s in sections_for(stage)]
    for section in sections_for(stage):
        for key, _, _ in section_fields(section):
            line = next((ln for ln in text.splitlines() if ln.startswith(f"  {key} ")), None)
            assert line is not None, f"{stage}: {key} missing"
            value = cfg.get(key) if section is None else cfg[section][key.split(".", 1)[1]]
            if isinstance(value, (int, float, str)) and not isinstance(value, bool) and len(str(value)) < 30 and value != "":
                assert f" {value} " in line + " ", (key, value, line)
    if stage in ("sft", "rm", "rl", "dpo"):
        assert "[train]" in text and "[peft]" in text and "[megatron]" in text
    if stage in ("eval", "its", "data"):
        assert "[train]" not in text and "[megatron]" not in text


def test_help_docs_come_from_the_schema_and_the_stage_file():
    rl = stage_help("rl", [])
    assert re.search(r"^  train\.max_steps +int +-1 +>0 overrides epochs", rl, flags=re.M)
    assert re.search(r"^  rl\.top_p +float +1\.0 .*\[in \(0, 1\]\]", rl, flags=re.M)  # the field's rule
    assert re.search(r"^  rl\.k +int +4 +rollouts per prompt", rl, flags=re.M)
    its = stage_help("its", [])  # no comment in the schema: conf/stage/its.yaml's
    assert re.search(r"^  its\.responses +int +1 +N initial responses per prompt", its, flags=re.M)
    assert re.search(r"^  model\.path +str +builtin:tiny +HF hub id, local directory", its, flags=re.M)


def test_help_shows_the_values_of_the_given_args():
    megatron = stage_help("sft", ["engine=megatron"])
    assert "engine=megatron, model=llama33_70b" in megatron
    assert re.search(r"^  parallel\.tp +int +8 ", megatron, flags=re.M)  # the 70B model file's sft plan
    assert re.search(r"^  train\.seq_len +int +4096 ", megatron, flags=re.M)


def test_help_through_the_cli():
    proc = launcher("rm", "--help", "train.lr=3e-6")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ./launch.sh rm [key=value ...] [--config FILE.yaml] [--dry-run]")
    assert re.search(r"^  train\.lr +float +3e-06 ", proc.stdout, flags=re.M)
    assert re.search(r"^  rm\.keep_best +bool +true ", proc.stdout, flags=re.M)
    top = launcher("help", "sft")
    assert top.returncode == 0 and top.stdout.startswith("usage: ./launch.sh sft")


# ---- config STAGE --------------------------------------------------------------------------------

def test_config_only_and_diff():
    only = launcher("config", "sft", "--only", "train", "train.lr=3e-5")
    assert only.returncode == 0, only.stderr
    assert list(yaml.safe_load(only.stdout)) == ["train"] and yaml.safe_load(only.stdout)["train"]["lr"] == 3e-5
    diff = launcher("config", "sft", "--diff", "train.lr=3e-5", "tp=2", "cluster.time=12:00:00")
    assert diff.returncode == 0, diff.stderr
    assert yaml.safe_load(diff.stdout) == {"train": {"lr": 3e-5}, "parallel": {"tp": 2}, "cluster": {"time": "12:00:00"}}
    none = launcher("config", "rl", "--diff")
    assert none.stdout.strip() == "# rl: nothing differs from the defaults"


def test_a_diff_is_a_config_file(tmp_path):
    """`config --diff` printed into a file and passed back with --config gives the same resolved config."""
    args = ["train.lr=3e-5", "tp=2", "peft.enabled=true", "rl.k=8", "cluster.account=0123"]
    diff = launcher("config", "rl", "--diff", *args)
    (tmp_path / "mine.yaml").write_text(diff.stdout)
    assert to_yaml(compose("rl", ["--config", str(tmp_path / "mine.yaml")])) == to_yaml(compose("rl", args))


# ---- did you mean --------------------------------------------------------------------------------

@pytest.mark.parametrize("args, hint", [
    (["sfft"], "(did you mean sft?)"),
    (["pipline"], "(did you mean pipeline?)"),
    (["stauts", "runs/x"], "(did you mean status?)"),
    (["sft", "lr=1e-5"], "(did you mean train.lr?)"),
    (["sft", "trian.lr=1e-5"], "Did you mean: 'train'?"),  # OmegaConf's own hint
    (["config", "sft", "--only", "trian"], "(did you mean train?)"),
    (["pipeline", "sfft:train.lr=0.5"], "(did you mean sft?)"),
    (["lokc"], "(did you mean lock?)"),  # ./launch.sh's own commands are suggested too
    (["hlep"], "(did you mean help?)"),
])
def test_did_you_mean(args, hint):
    proc = launcher(*args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and hint in proc.stderr, proc.stderr


# ---- --config FILE -------------------------------------------------------------------------------

def test_a_saved_config_reruns_its_stage_byte_for_byte(tmp_path):
    run = tmp_path / "run"
    first = launcher("data", f"run_dir={run}", f"prep.source={SAMPLE_DIR}", "prep.max_seq_len=1024", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = (run / "data" / "config.yaml").read_bytes()
    shown = launcher("config", "data", "--config", run / "data" / "config.yaml")
    assert shown.returncode == 0 and shown.stdout.encode() == saved
    again = launcher("data", "--config", run / "data" / "config.yaml", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "data" / "config.yaml").read_bytes() == saved


def test_a_saved_training_config_round_trips(tmp_path, edit_data_dir):
    run = tmp_path / "run"
    first = launcher("sft", f"run_dir={run}", f"data={edit_data_dir}", "train.max_steps=1", "train.lr=3e-4",
                     "cluster.time=12:00:00", "cluster.account=0123", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = (run / "sft" / "config.yaml").read_bytes()
    assert b"time: '12:00:00'" in saved and b"account: '0123'" in saved
    shown = launcher("config", "sft", "--config", run / "sft" / "config.yaml")
    assert shown.returncode == 0 and shown.stdout.encode() == saved, shown.stderr
    # the stage itself, rerun from its saved config: the same config (so its own run, finished: not refused as
    # another run's settings), and config.yaml is what it was
    again = launcher("sft", "--config", run / "sft" / "config.yaml", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "sft" / "config.yaml").read_bytes() == saved
    dry = launcher("sft", "--config", run / "sft" / "config.yaml", "--dry-run")
    assert dry.returncode == 0 and "train:" in dry.stdout, dry.stderr


def test_config_file_layers(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("engine: megatron\nmodel: llama33_70b\ntrain: {lr: 1.0e-6}\n"
                    "stages:\n  rm: {train: {lr: 2.0e-7}}\n")
    sft = compose("sft", ["--config", str(mine)])
    assert (sft.engine, sft.model.name, sft.train.lr, sft.parallel.tp) == ("megatron", "llama33_70b", 1e-6, 8)
    assert compose("rm", ["--config", str(mine)]).train.lr == 2e-7  # its stages: block
    assert compose("sft", ["--config", str(mine), "train.lr=5e-6"]).train.lr == 5e-6  # the command line wins
    assert compose("sft", [f"--config={mine}", "engine=hf"]).engine == "hf"


@pytest.mark.parametrize("body, message", [
    ("train: {lrr: 1}\n", "--config {path}: unknown key train.lrr"),
    ("stage: rm\n", "--config {path}: a config of the rm stage (stage: rm), not of sft"),
    ("- a\n- list\n", "cannot read {path}: expected a mapping"),
    ("stages: [sft]\n", "--config {path}: stages must map a stage to its keys"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        compose("sft", ["--config", str(path)])
    assert message.format(path=path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="--config /no/such.yaml: no such file"):
        compose("sft", ["--config", "/no/such.yaml"])
    with pytest.raises(ConfigError, match="--config needs a file"):
        compose("sft", ["--config"])


# ---- conf/examples -------------------------------------------------------------------------------

EXAMPLES = sorted((REPO_ROOT / "conf" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_each_example_composes_for_every_entry_of_its_pipeline(path, tmp_path):
    """Each example's own command line (the first `./launch.sh ...` line of its header) composes for every
    entry of the chain it runs; a SLURM one also renders each job's config (one process per GPU)."""
    from launcher.pipeline import stage_args
    from launcher.slurm import job_config

    command = next(ln for ln in path.read_text().splitlines() if ln.startswith("#   ./launch.sh pipeline"))
    args = command.split("./launch.sh pipeline", 1)[1].split()
    args = [str(REPO_ROOT / a) if a.startswith("conf/examples/") else a.replace("cluster=NAME", "cluster=example")
            for a in args] + [f"run_dir={tmp_path}"]
    chain, entry_args, _ = stage_args("default", args)
    cfgs = {name: compose(entry.stage, entry_args[name]) for name, entry in chain.items()}
    if path.stem == "llama33_70b_megatron_4nodes":
        assert list(chain)[:3] == ["data", "import", "sft"] and "rl_export" in chain  # the Megatron chain
        assert cfgs["sft"].engine == "megatron" and cfgs["sft"].parallel.tp == 8 and cfgs["sft"].parallel.nodes == 4
        for cfg in cfgs.values():
            assert cfg.executor == "slurm" and cfg.cluster.nodes == 4
            job_config(cfg)
    elif path.stem == "llama33_70b_lora_1node":
        sft = cfgs["sft"]
        assert (sft.model.name, sft.peft.enabled, sft.hf.num_processes, sft.train.seq_len) == ("llama33_70b_lora", True, 8, 4096)
        assert cfgs["rl"].train.global_batch == 64 and cfgs["rl"].rl.prompts_per_step == 16
    elif path.stem == "cpu_smoke":
        assert cfgs["data"].prep.source == "data_prep/sample" and cfgs["rl"].train.max_steps == 6
        assert cfgs["eval"].eval.gold_rm == "builtin:tiny-gold" and cfgs["sft"].model.name == "tiny"
    else:
        pytest.fail(f"{path.name}: an example without a test of what it sets")
    assert Path(str(cfgs["sft"].run_dir)) == tmp_path
