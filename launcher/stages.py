"""The pipeline's job graph, read from a preset (conf/pipeline/NAME.yaml), and `is_finished`.

Neutral ground: launcher.pipeline (runs the chain here) and launcher.slurm (submits it with afterok)
both import this module; neither imports the other.

A preset:
    args: [key=value, ...]              # every entry of the chain
    chain:                              # ordered: an entry runs after the entries it needs
      NAME: {stage: STAGE, needs: [NAME, ...], args: [key=value, ...]}
`stage` defaults to NAME. An entry whose NAME is not its stage writes run_dir/NAME (so two `convert`
entries, e.g. sft_export and rl_export, can coexist) and names its SLURM files NAME.*.
On the command line, `key=value` applies to every entry and `NAME:key=value` to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from recipes.config import CONF_DIR, STAGES, ConfigError, to_yaml


@dataclass(frozen=True)
class Entry:
    name: str
    stage: str
    needs: tuple[str, ...] = ()
    args: tuple[str, ...] = field(default_factory=tuple)

    def config_args(self) -> list[str]:
        """The args that place this entry: its name and, when that is not its stage, its own dir."""
        if self.name == self.stage:
            return []
        return [f"name={self.name}", f"out=${{run_dir}}/{self.name}"]


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "pipeline").glob("*.yaml"))


def load_preset(name: str) -> tuple[list[str], dict[str, Entry]]:
    """(args for every entry, the chain NAME -> Entry in order), checked: known stages, needs that
    name earlier entries."""
    path = CONF_DIR / "pipeline" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"pipeline preset {name!r}: no such file {path} (presets: {', '.join(preset_names())})")
    try:
        preset = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:
        raise ConfigError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    unknown = set(preset) - {"args", "chain"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (a preset has `args` and `chain`)")
    chain: dict[str, Entry] = {}
    for entry_name, spec in (preset.get("chain") or {}).items():
        spec = spec or {}
        bad = set(spec) - {"stage", "needs", "args"}
        if bad:
            raise ConfigError(f"{path}: chain.{entry_name}: unknown key(s) {', '.join(sorted(bad))} (stage, needs, args)")
        stage = spec.get("stage") or entry_name
        if stage not in STAGES:
            raise ConfigError(f"{path}: chain.{entry_name}: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        needs = tuple(spec.get("needs") or ())
        for need in needs:
            if need not in chain:
                raise ConfigError(f"{path}: chain.{entry_name} needs {need!r}, which is not an earlier entry of the chain")
        chain[entry_name] = Entry(entry_name, stage, needs, tuple(str(a) for a in spec.get("args") or ()))
    if not chain:
        raise ConfigError(f"{path}: the preset has no `chain`")
    return [str(a) for a in preset.get("args") or ()], chain


# How a run was launched, not what it computes: a stage rendered for SLURM (executor=slurm in its
# config.yaml: the Megatron engine renders its files at submission) is the same run as its job's config.
LAUNCH_KEYS = ("executor", "dry_run")


def _what_runs(config_text: str) -> dict:
    config = yaml.safe_load(config_text) or {}
    return {k: v for k, v in config.items() if k not in LAUNCH_KEYS}


def flatten(node, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; an empty mapping stays a leaf."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def setting_changes(stored: dict, cfg) -> list[str]:
    """`key: was -> now` for each setting of a stored config.yaml (a dict) that this config changes, launch
    keys aside. A key the stored config does not have (the schema grew since it was written) counts only
    when this config sets it to something other than the schema's default: a stage finished before a new
    key existed is not rerun for it."""
    from recipes.config import RunConfig

    was = flatten(_what_runs(to_yaml(OmegaConf.create(stored))))
    now = flatten(_what_runs(to_yaml(cfg)))
    default = flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig)))
    changes = [f"{k}: {was[k]} -> {now[k]}" for k in now if k in was and was[k] != now[k]]
    changes += [f"{k}: (not set) -> {now[k]}" for k in now if k not in was and now[k] != default.get(k)]
    return changes + [f"{k}: {was[k]} -> (no such key)" for k in was if k not in now]


def stored_config(out: Path) -> dict | None:
    """OUT/config.yaml as a dict, or None (absent, damaged, not a mapping)."""
    try:
        data = yaml.safe_load((Path(out) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def is_finished(cfg) -> bool:
    """A stage is finished when it wrote summary.json under the same config (launch keys aside; keys the
    schema gained since, at their defaults, aside). A
    Megatron conversion also needs its destination to still hold what it wrote, converted from the
    source as it is now (recipes.megatron.convert.is_current): its job runs the upstream converter,
    which refuses a non-empty destination, so a rerun would fail and cancel the chain behind it."""
    out = Path(cfg.out)
    stored = stored_config(out)
    if not ((out / "summary.json").is_file() and stored is not None and not setting_changes(stored, cfg)):
        return False
    if cfg.stage == "convert" and cfg.engine == "megatron":
        from recipes.megatron.convert import is_current

        return is_current(cfg)
    return True
