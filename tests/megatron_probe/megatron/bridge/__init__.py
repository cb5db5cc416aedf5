"""PROBE, not Megatron-Bridge: stands in for `megatron.bridge` (which needs GPUs, CUDA, Transformer Engine
and Python 3.12) where tests run recipes/megatron/bridge_sft.py's in-container half for real (on the test
SLURM too: tests/test_megatron_chain_slurm.py). It has only the names that wrapper imports, and each one
records what it received (one JSON line per call in $PROBE_LOG) and computes nothing Megatron-Bridge
computes: no recipe, no override parsing, no packing, no train_iters, no training, no tracker.

  recipe / AutoBridge.from_hf_pretrained / process_config_with_overrides   record their arguments; the
      "container" they return only carries what the wrapper set on it (dataset, overrides);
  GPTSFTDatasetBuilder.prepare_data      records the call (the wrapper's pack-once-before-any-collective
      order is what a test checks); writes no packs;
  finetune                               records the dataset and overrides it received, then creates the
      directory checkpoint.save names with that record in it (the export after sft reads that directory:
      it is all the next job needs), and returns, as Megatron-Bridge's finetune returns when its loop
      reached train_iters. $PROBE_HOLD: wait until that file is gone first (a test kills the job while it
      waits). $PROBE_EXIT=signal: sys.exit(0) instead, as Megatron-Bridge does after an exit-signal
      checkpoint (train.py:794-805); the checkpoint itself is whatever the test put there.
  training.utils.checkpoint_utils        Megatron-Bridge's OWN module (read_train_state, the tracker's name)
      from the pinned wheel ($PROBE_MB_WHEEL, $PROBE_MCORE_WHEEL; tests/megatron_probe/mb_upstream.py says
      what of its imports is left out); absent without those variables.
A GPU cluster verifies the real thing (tests/gpu/).
"""
from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

__version__ = "probe"


def _log(event: str, **data) -> None:
    with open(os.environ["PROBE_LOG"], "a") as f:
        f.write(json.dumps({"event": event, "pid": os.getpid(), "rank": os.environ.get("RANK"), **data}, default=str) + "\n")


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


class Recorded:
    """A config object of Megatron-Bridge, as the wrapper builds it: the keyword arguments it was given."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def record(self) -> dict:
        return {k: (v.record() if isinstance(v, Recorded) else v) for k, v in self.__dict__.items()}


class AutoBridge:
    @classmethod
    def from_hf_pretrained(cls, path, **kwargs):
        _log("from_hf_pretrained", path=str(path))
        return cls()


class GPTSFTDatasetBuilder:
    def __init__(self, config, tokenizer):
        self.config = config

    def prepare_data(self):
        _log("prepare_data", dataset=self.config.record())


class Container:
    """What a recipe returns, as far as the wrapper touches it: .dataset, .tokenizer (handed to build_tokenizer),
    then .train.train_iters after finetune (None here: only Megatron-Bridge derives it from train.num_epochs)."""

    def __init__(self, recipe: str):
        self.recipe, self.dataset, self.overrides, self.tokenizer = recipe, None, [], None
        self.train = types.SimpleNamespace(train_iters=None)


def __getattr_recipes(name: str):
    if name.startswith("__"):  # __file__, __spec__, ...: a module attribute, not a recipe
        raise AttributeError(name)

    def recipe():
        AutoBridge.from_hf_pretrained("meta-llama/Meta-Llama-3.1-70B")  # as the 70B recipes do
        _log("recipe", name=name)
        return Container(name)
    return recipe


def process_config_with_overrides(container, cli_overrides):
    container.overrides = list(cli_overrides)
    _log("overrides", overrides=container.overrides)
    return container


def finetune(config, forward_step_func):
    _log("finetune", recipe=config.recipe, dataset=config.dataset.record(), overrides=config.overrides)
    hold = os.environ.get("PROBE_HOLD")
    while hold and Path(hold).exists():
        time.sleep(0.5)
    save = next(o.split("=", 1)[1] for o in config.overrides if o.startswith("checkpoint.save="))
    Path(save).mkdir(parents=True, exist_ok=True)
    (Path(save) / f"PROBE_FINETUNE-rank{os.environ.get('RANK')}.json").write_text(
        json.dumps({"dataset": config.dataset.record(), "overrides": config.overrides}, default=str))
    if os.environ.get("PROBE_EXIT") == "signal":
        sys.exit(0)


recipes = _module("megatron.bridge.recipes")
llama = _module("megatron.bridge.recipes.llama")
llama.__getattr__ = __getattr_recipes
_module("megatron.bridge.data")
_module("megatron.bridge.data.builders", ChatSFTPreprocessingConfig=Recorded, GPTSFTDatasetConfig=Recorded,
        GPTSFTDatasetBuilder=GPTSFTDatasetBuilder)
_module("megatron.bridge.data.packing", PackedSequenceSpecs=Recorded)
_module("megatron.bridge.training")
_module("megatron.bridge.training.finetune", finetune=finetune)
_module("megatron.bridge.training.gpt_step", forward_step=lambda *a: None)
_module("megatron.bridge.training.tokenizers")
_module("megatron.bridge.training.tokenizers.tokenizer", build_tokenizer=lambda cfg: _log("build_tokenizer"))
_module("megatron.bridge.training.utils")
_module("megatron.bridge.training.utils.omegaconf_utils", process_config_with_overrides=process_config_with_overrides)
if os.environ.get("PROBE_MB_WHEEL") and os.environ.get("PROBE_MCORE_WHEEL"):
    from mb_upstream import CHECKPOINT_UTILS, load_checkpoint_utils

    _module(CHECKPOINT_UTILS)  # the parent's attribute, then the real module in its place
    sys.modules[CHECKPOINT_UTILS] = load_checkpoint_utils(os.environ["PROBE_MB_WHEEL"], os.environ["PROBE_MCORE_WHEEL"])
