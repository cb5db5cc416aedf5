"""PROBE, not Megatron-Bridge: stands in for `megatron.bridge` (which needs GPUs, CUDA and Python 3.12)
where tests run recipes/megatron/bridge_sft.py's in-container half for real. It records what our wrapper
hands it (JSON lines in $PROBE_LOG) and checks the calls are in the order Megatron-Bridge requires.

Behaviour of the probe's `finetune` ($PROBE_MODE):
  complete  resolve train_iters from train.num_epochs as Megatron-Bridge 0.6.0 does
            (training/config.py:1586-1593: ceil(num_epochs * ceil(dataset size / global batch)), the
            dataset size being the number of packs with packing), "save" the last iteration, return;
  preempt   the same, "save" iteration 1 and sys.exit(0), as train.py:794-805 does after its
            exit-signal checkpoint.
Only the names our wrapper imports exist here; a GPU cluster verifies the real ones.
"""
from __future__ import annotations

import json
import math
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

__version__ = "probe"


def _log(event: str, **data) -> None:
    with open(os.environ["PROBE_LOG"], "a") as f:
        f.write(json.dumps({"event": event, "pid": os.getpid(), "rank": os.environ.get("RANK"), **data}) + "\n")


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


class AutoBridge:
    @classmethod
    def from_hf_pretrained(cls, path, **kwargs):
        _log("from_hf_pretrained", path=path)
        return cls()


@dataclass
class ChatSFTPreprocessingConfig:
    loss_mode: str = "assistant"


@dataclass
class PackedSequenceSpecs:
    packed_sequence_size: int = -1
    pad_seq_to_mult: int | None = None


@dataclass
class GPTSFTDatasetConfig:
    dataset_root: str
    seq_length: int
    preprocessing: ChatSFTPreprocessingConfig
    do_validation: bool = True
    do_test: bool = True
    enable_offline_packing: bool = False
    offline_packing_specs: PackedSequenceSpecs | None = None
    dataset_kwargs: dict | None = None
    seed: int = 1234
    dataloader_type: str = "single"


def _packs(config: GPTSFTDatasetConfig) -> Path:
    return Path(config.dataset_root) / "packed_probe.json"


class GPTSFTDatasetBuilder:
    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer

    def prepare_data(self):
        """Packs (greedily, 2 conversations per pack) unless the packs exist: gpt_sft.py:653-655 skips."""
        rows = Path(self.config.dataset_root, "training.jsonl").read_text().splitlines()
        _log("prepare_data", rows=len(rows), exists=_packs(self.config).exists())
        if not _packs(self.config).exists():
            _packs(self.config).write_text(json.dumps({"packs": math.ceil(len(rows) / 2)}))


@dataclass
class _Section:
    values: dict = field(default_factory=dict)

    def __getattr__(self, key):
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        if key == "values":
            self.__dict__["values"] = value
        else:
            self.__dict__["values"][key] = value


class ConfigContainer:
    def __init__(self):
        self.train, self.checkpoint, self.tokenizer = _Section(), _Section(), _Section()
        self.dataset = None


def llama31_70b_sft_config():
    AutoBridge.from_hf_pretrained("meta-llama/Meta-Llama-3.1-70B")
    return ConfigContainer()


def process_config_with_overrides(container, cli_overrides):
    for item in cli_overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if hasattr(container, section) and isinstance(getattr(container, section), _Section):
            parsed = None if value == "null" else json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
            setattr(getattr(container, section), name, parsed)
    return container


def _tracker(save_dir: str, prefix: str | None = None) -> str:
    return str(Path(save_dir) / f"{prefix}_train_state.json")


def _read_train_state(path: str):
    return types.SimpleNamespace(step=json.loads(Path(path).read_text())["step"])


def finetune(config, forward_step_func):
    data = config.dataset
    packs = json.loads(_packs(data).read_text())["packs"] if data.enable_offline_packing else None
    size = packs if packs is not None else len(Path(data.dataset_root, "training.jsonl").read_text().splitlines())
    if config.train.num_epochs is not None:  # training/config.py:1592-1593
        config.train.train_iters = math.ceil(config.train.num_epochs * math.ceil(size / config.train.global_batch_size))
    _log("finetune", train_iters=config.train.train_iters, dataset_size=size, packed=packs is not None,
         dataloader_type=data.dataloader_type, loss_mode=data.preprocessing.loss_mode,
         exit_signal_handler=config.train.exit_signal_handler)
    save = config.checkpoint.save
    Path(save).mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("PROBE_MODE", "complete")
    step = 1 if mode == "preempt" else config.train.train_iters
    Path(_tracker(save, "latest")).write_text(json.dumps({"step": step}))
    if mode == "preempt":
        sys.exit(0)


_module("megatron.bridge.data")
_module("megatron.bridge.data.builders", ChatSFTPreprocessingConfig=ChatSFTPreprocessingConfig,
        GPTSFTDatasetConfig=GPTSFTDatasetConfig, GPTSFTDatasetBuilder=GPTSFTDatasetBuilder)
_module("megatron.bridge.data.packing", PackedSequenceSpecs=PackedSequenceSpecs)
_module("megatron.bridge.recipes")
_module("megatron.bridge.recipes.llama", llama31_70b_sft_config=llama31_70b_sft_config)
_module("megatron.bridge.training")
_module("megatron.bridge.training.finetune", finetune=finetune)
_module("megatron.bridge.training.gpt_step", forward_step=lambda *a: None)
_module("megatron.bridge.training.tokenizers")
_module("megatron.bridge.training.tokenizers.tokenizer", build_tokenizer=lambda cfg: ("tokenizer", cfg))
_module("megatron.bridge.training.utils")
_module("megatron.bridge.training.utils.omegaconf_utils", process_config_with_overrides=process_config_with_overrides)
_module("megatron.bridge.training.utils.checkpoint_utils", TRACKER_PREFIX="latest",
        get_checkpoint_train_state_filename=_tracker, read_train_state=_read_train_state)
