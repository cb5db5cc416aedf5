"""PROBE, not Megatron-Bridge's scripts/conversion/run_conversion.py (the HF <-> Megatron conversion worker;
the conversion itself needs Megatron-Bridge's container). It stands at megatron.megatron_bridge_dir in the
tests (tests/test_megatron_convert.py, tests/test_megatron_chain_slurm.py).

What it does, in order:
  1. appends what it received (argv, host) as one JSON line to $PROBE_RECORD;
  2. runs Megatron-Bridge's OWN destination check, prepare_output_directory from the pinned
     scripts/conversion/utils.py ($PROBE_MB_SCRIPTS: that directory of tests/upstream.toml's
     megatron_bridge git tree), called as its cpu_backend calls it (cpu_backend.py:65, 105 at v0.6.0):
     a non-empty destination raises FileExistsError there, as it would in the container;
  3. writes only what the next stage needs: for `import`, the record itself (sft's finetune is a probe too
     and reads nothing of it); for `export`, an HF causal LM dir made by transformers from --hf-model
     (the base model's own weights: nothing of Megatron-Bridge's conversion is imitated).
What only a GPU cluster verifies: the conversion (tests/gpu/).
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

argv = sys.argv[1:]
with open(os.environ["PROBE_RECORD"], "a") as record:
    record.write(json.dumps({"probe": "run_conversion", "argv": argv, "host": socket.gethostname()}) + "\n")


def flag(name: str) -> str:
    return argv[argv.index(name) + 1]


spec = importlib.util.spec_from_file_location("mb_conversion_utils", Path(os.environ["PROBE_MB_SCRIPTS"]) / "utils.py")
utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(utils)
if argv[0] == "import":
    dest = utils.prepare_output_directory(flag("--megatron-path"), overwrite=False, source_paths=[flag("--hf-model")])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "PROBE_RECORD.json").write_text(json.dumps({"argv": argv}))
elif argv[0] == "export":
    dest = utils.prepare_output_directory(flag("--hf-path"), overwrite=False,
                                          source_paths=[flag("--megatron-path"), flag("--hf-model")])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(flag("--hf-model")).save_pretrained(dest)
    AutoTokenizer.from_pretrained(flag("--hf-model")).save_pretrained(dest)
else:
    sys.exit(f"PROBE run_conversion: unknown command {argv[:1]}")
print(f"PROBE run_conversion {argv[0]} -> {dest}", flush=True)
