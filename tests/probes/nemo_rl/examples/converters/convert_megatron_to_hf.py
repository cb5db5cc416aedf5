"""PROBE, not NeMo-RL's examples/converters/convert_megatron_to_hf.py (Megatron policy checkpoint -> HF; it
needs megatron.bridge, i.e. the image's mcore environment and a GPU node's stack). It stands at
megatron.nemo_rl_dir in the SLURM chain test (tests/test_megatron_chain_slurm.py), run by our convert job as
the real one is (recipes/megatron/convert.py: `python-MegatronPolicyWorker SCRIPT --config ... --megatron-ckpt-path
... --hf-ckpt-path ...`).

  1. appends what it received (argv, which python ran it) as one JSON line to $PROBE_RECORD (when set);
  2. runs NeMo-RL's OWN export_model_from_megatron from the pinned source (community_import.py:204-245 at
     v0.7.0; the function alone, compiled from that file: its module imports megatron.bridge at the top): its
     first statement refuses an existing --hf-ckpt-path (FileExistsError); its next one imports
     megatron.bridge, which is absent here, and that ImportError is where the probe takes over;
  3. writes only what the eval after it needs: an HF causal LM dir made by transformers from the checkpoint
     config's policy.model_name (the model the policy started from: nothing of the conversion is imitated).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--hf-model-name")
parser.add_argument("--megatron-ckpt-path", required=True)
parser.add_argument("--hf-ckpt-path", required=True)
args = parser.parse_args()
if os.environ.get("PROBE_RECORD"):
    with open(os.environ["PROBE_RECORD"], "a") as record:
        record.write(json.dumps({"probe": "convert_megatron_to_hf", "argv": sys.argv[1:],
                                 "launcher": os.environ.get("PROBE_MCORE_LAUNCHER")}) + "\n")

import nemo_rl  # noqa: E402  (the pinned source, on the path)

source_file = Path(nemo_rl.__file__).parent / "models" / "megatron" / "community_import.py"
[function] = [n for n in ast.parse(source_file.read_text()).body
              if isinstance(n, ast.FunctionDef) and n.name == "export_model_from_megatron"]
namespace = {"os": os, "Any": Any, "Optional": Optional, "AutoBridge": None}
exec(compile(ast.Module(body=[function], type_ignores=[]), str(source_file), "exec"), namespace)
policy = yaml.safe_load(Path(args.config).read_text())["policy"]
try:
    namespace["export_model_from_megatron"](hf_model_name=args.hf_model_name or policy["model_name"],
                                            input_path=args.megatron_ckpt_path, output_path=args.hf_ckpt_path,
                                            hf_tokenizer_path=policy["tokenizer"]["name"])
except ImportError as exc:  # megatron.bridge: the conversion itself needs the image's mcore environment
    print(f"PROBE convert_megatron_to_hf: NeMo-RL's export stops at {exc!r} here", flush=True)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

AutoModelForCausalLM.from_pretrained(policy["model_name"]).save_pretrained(args.hf_ckpt_path)
AutoTokenizer.from_pretrained(policy["tokenizer"]["name"]).save_pretrained(args.hf_ckpt_path)
print(f"PROBE convert_megatron_to_hf -> {args.hf_ckpt_path}", flush=True)
