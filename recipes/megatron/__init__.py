"""The Megatron engine: parallel plans (plan.py), Megatron-Bridge SFT (bridge_sft.py), NeMo-RL reward
model / RLOO / DPO (nemo_rl.py) and HF <-> Megatron checkpoint conversion (convert.py).

Import-light on purpose: nothing here imports megatron, torch or NVIDIA's frameworks at module load.
Each stage module exposes `render(cfg)` (writes, into cfg.out, the files its command reads plus
command.sh) and `build_command(cfg) -> list[str]` (the command itself, without writing anything).

For the SLURM executor:
  * `build_command(cfg)` below renders the stage's files and returns its command:
      sft      `python -m recipes.megatron.bridge_sft --config OUT/megatron_bridge_sft.yaml`, one task per
               GPU with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set (torch.distributed
               env:// initialisation);
      rm/rl/dpo `python -m recipes.megatron.nemo_rl ...` (data hand-over, then NeMo-RL's entry point), once,
               on the Ray head node;
      convert  `python -m recipes.megatron.convert --stage-config OUT/config.yaml`, one task: runs
               Megatron-Bridge's conversion worker or NeMo-RL's converter once, into an empty place, and
               records what it converted (convert.py: a resubmitted chain does not convert again).
    Rendering reads no stage inputs (the data, an earlier stage's checkpoint): a pipeline renders and
    submits every job before the first one has run; the jobs read their inputs.
  * `job_nodes(cfg)` is the (nodes, GPUs per node) the stage's plan needs: parallel.nodes /
    parallel.gpus_per_node when the model file sets them (the 70B plans do), else the cluster's.
"""
from __future__ import annotations

import importlib

STAGE_MODULES = {"sft": "recipes.megatron.bridge_sft", "convert": "recipes.megatron.convert",
                 "rm": "recipes.megatron.nemo_rl", "rl": "recipes.megatron.nemo_rl", "dpo": "recipes.megatron.nemo_rl",
                 "feedback": "recipes.feedback"}  # the Feedback model: bridge_sft's job on feedback/


def stage_module(cfg):
    if cfg.stage not in STAGE_MODULES:
        from recipes.config import ConfigError

        raise ConfigError(f"stage {cfg.stage} has no Megatron-engine command (stages: {', '.join(STAGE_MODULES)})")
    return importlib.import_module(STAGE_MODULES[cfg.stage])


def build_command(cfg) -> list[str]:
    """Render the stage's files into cfg.out and return the command that runs it (a module's
    `job_command` when it has one: convert's job wraps the upstream worker that `build_command` names)."""
    from recipes.preemption import check_output_dir_is_ours

    module = stage_module(cfg)
    check_output_dir_is_ours(cfg.out)  # someone else's files in OUT: refused before anything is written there
    module.render(cfg)
    return getattr(module, "job_command", module.build_command)(cfg)


def job_nodes(cfg) -> tuple[int, int]:
    """(nodes, GPUs per node) to allocate for the stage (rl: including the reward model's nodes)."""
    nodes = cfg.parallel.nodes or cfg.cluster.nodes
    gpus = cfg.parallel.gpus_per_node or cfg.cluster.gpus_per_node or 8
    return nodes, gpus


def slurm_time_seconds(value: str) -> int:
    """A SLURM --time value (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds."""
    from recipes.config import ConfigError

    text = str(value).strip()
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    try:
        parts = [int(p) for p in rest.split(":")]
        day_count = int(days)
    except ValueError:
        raise ConfigError(f"cluster.time={value}: not a SLURM time (MM, HH:MM:SS, D-HH:MM:SS)") from None
    if "-" in text:  # D-HH[:MM[:SS]]
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, sec = 0, parts[0], parts[1]
    else:
        h, m, sec = parts[:3]
    return ((day_count * 24 + h) * 60 + m) * 60 + sec


# train.lr_scheduler (transformers' names) -> Megatron's lr_decay_style
MEGATRON_DECAY_STYLES = {"constant": "constant", "linear": "linear", "cosine": "cosine"}


def megatron_decay_style(name: str) -> str:
    if name not in MEGATRON_DECAY_STYLES:
        from recipes.config import ConfigError

        raise ConfigError(f"train.lr_scheduler={name}: the Megatron engine supports {', '.join(MEGATRON_DECAY_STYLES)}")
    return MEGATRON_DECAY_STYLES[name]
