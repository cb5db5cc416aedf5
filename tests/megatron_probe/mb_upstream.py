"""Megatron-Bridge's checkpoint_utils (read_train_state and the tracker's file name) and its TrainState,
loaded from the pinned release wheel (tests/upstream.toml) on a CPU machine with Python 3.11, where
`import megatron.bridge` cannot run (its package __init__ imports Transformer Engine, triton and every model).

    module = load_checkpoint_utils(MB_WHEEL_DIR, MCORE_WHEEL_DIR)   # .read_train_state, .TrainState, ...

What is NOT the wheel's code, and why (everything else is, file for file):
  * megatron.bridge.training.state: only its TrainState class is executed (its source, cut out of
    state.py), without that module's other imports (megatron-core timers, energy monitor, straggler
    detection, ConfigContainer), which need the GPU stack;
  * megatron.bridge.training.utils.config_utils: not loaded (it imports megatron.training and
    transformers' config classes for read_run_config, which read_train_state does not use);
  * megatron.bridge.utils.common_utils: get_rank_safe / get_world_size_safe are megatron-core's own
    _rank_utils functions (common_utils.py:25-26 re-exports exactly those), print_rank_0 prints on rank 0;
  * package __init__ files are not run.
checkpoint_utils.py itself runs as shipped, with megatron-core's msc_utils.py, _rank_utils.py and
_slurm_utils.py from the pinned megatron-core wheel. sys.modules is as it was afterwards: the loaded
module keeps the names it bound.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

CHECKPOINT_UTILS = "megatron.bridge.training.utils.checkpoint_utils"


def _file_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _train_state_module(state_py: Path) -> types.ModuleType:
    """megatron.bridge.training.state with only TrainState executed (its own source)."""
    source = state_py.read_text()
    [node] = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "TrainState"]
    first = min([d.lineno for d in node.decorator_list] + [node.lineno])
    class_source = "\n".join(source.splitlines()[first - 1:node.end_lineno])
    module = types.ModuleType("megatron.bridge.training.state")
    module.__file__ = str(state_py)
    sys.modules[module.__name__] = module  # dataclass() looks its module up there
    exec(compile("from dataclasses import dataclass\nfrom typing import Any, Optional\nimport torch\n"
                 "from torch.distributed.checkpoint.stateful import Stateful\n\n" + class_source,
                 str(state_py), "exec"), module.__dict__)
    return module


def load_checkpoint_utils(mb_wheel: str | Path, mcore_wheel: str | Path) -> types.ModuleType:
    mb = Path(mb_wheel) / "megatron" / "bridge"
    core = Path(mcore_wheel) / "megatron" / "core"
    names = ["megatron", "megatron.core", "megatron.core.msc_utils", "megatron.core._slurm_utils",
             "megatron.core._rank_utils", "megatron.bridge", "megatron.bridge.training", "megatron.bridge.training.state",
             "megatron.bridge.training.utils", "megatron.bridge.training.utils.config_utils", "megatron.bridge.utils",
             "megatron.bridge.utils.common_utils", CHECKPOINT_UTILS]
    saved = {name: sys.modules.get(name) for name in names}
    try:
        for name, path in (("megatron", None), ("megatron.core", core), ("megatron.bridge", mb),
                           ("megatron.bridge.training", mb / "training"), ("megatron.bridge.training.utils", mb / "training" / "utils"),
                           ("megatron.bridge.utils", mb / "utils")):
            package = types.ModuleType(name)
            package.__path__ = [str(path)] if path else []
            sys.modules[name] = package
        _file_module("megatron.core.msc_utils", core / "msc_utils.py")
        _file_module("megatron.core._slurm_utils", core / "_slurm_utils.py")
        rank_utils = _file_module("megatron.core._rank_utils", core / "_rank_utils.py")
        sys.modules["megatron.bridge.training.state"] = _train_state_module(mb / "training" / "state.py")
        sys.modules["megatron.bridge.training.utils.config_utils"] = types.ModuleType("megatron.bridge.training.utils.config_utils")
        sys.modules["megatron.bridge.training.utils.config_utils"].apply_run_config_backward_compat = None
        common = types.ModuleType("megatron.bridge.utils.common_utils")
        common.get_rank_safe = rank_utils.safe_get_rank
        common.get_world_size_safe = rank_utils.safe_get_world_size
        common.print_rank_0 = lambda message, *a, **k: print(message, flush=True) if rank_utils.safe_get_rank() == 0 else None
        sys.modules["megatron.bridge.utils.common_utils"] = common
        module = _file_module(CHECKPOINT_UTILS, mb / "training" / "utils" / "checkpoint_utils.py")
        return module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
