#!/usr/bin/env bash
# GPU checks of the Megatron engine (tests/gpu/test_megatron_gpu.py), each in its pinned container.
#
#   tests/gpu/run_gpu_checks.sh            # with docker: pulls/uses the images named in conf/engine/megatron.yaml
#   IN_CONTAINER=1 tests/gpu/run_gpu_checks.sh bridge|nemo_rl   # already inside the right container
#
# Images: the Megatron-Bridge one built by docker/build_megatron_bridge.sh (docker tag
# megatron-bridge:VERSION, megatron.megatron_bridge_version; on SLURM the same image as the .sqsh in megatron.container) and
# NeMo-RL's (megatron.nemo_rl_container). The NeMo-RL check needs 2 GPUs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

conf() { python3 -c "import yaml,sys; print(yaml.safe_load(open('conf/engine/megatron.yaml'))['megatron'][sys.argv[1]])" "$1"; }

run_tests() {  # $1 = pytest -k expression
  python -m pip install --quiet --no-deps -e . >/dev/null 2>&1 || true
  PYTHONPATH="$ROOT:${MEGATRON_BRIDGE_DIR:-/opt/Megatron-Bridge}/src:${PYTHONPATH:-}" \
    python -m pytest -v -m gpu -k "$1" tests/gpu/test_megatron_gpu.py -p no:cacheprovider
}

if [[ "${IN_CONTAINER:-0}" == 1 ]]; then
  case "${1:-}" in
    bridge)  run_tests megatron_bridge ;;
    nemo_rl) run_tests nemo_rl ;;
    *) echo "usage: IN_CONTAINER=1 $0 bridge|nemo_rl" >&2; exit 2 ;;
  esac
  exit $?
fi

command -v docker >/dev/null || { echo "error: docker not found; run inside the containers with IN_CONTAINER=1 $0 bridge|nemo_rl" >&2; exit 2; }
BRIDGE_IMAGE="${BRIDGE_IMAGE:-megatron-bridge:$(conf megatron_bridge_version)}"   # docker/build_megatron_bridge.sh
RL_IMAGE="$(conf nemo_rl_container)"

status=0
docker run --rm --gpus all --ipc=host -e HF_HUB_OFFLINE=1 -e IN_CONTAINER=1 -e MEGATRON_BRIDGE_DIR=/opt/Megatron-Bridge \
  -v "$ROOT:$ROOT" -w "$ROOT" "$BRIDGE_IMAGE" \
  bash tests/gpu/run_gpu_checks.sh bridge || status=1
docker run --rm --gpus all --ipc=host --shm-size=16g -e HF_HUB_OFFLINE=1 -e IN_CONTAINER=1 -e NEMO_RL_DIR=/opt/nemo-rl \
  -v "$ROOT:$ROOT" -w "$ROOT" "$RL_IMAGE" \
  bash tests/gpu/run_gpu_checks.sh nemo_rl || status=1
echo "gpu checks: $([[ $status == 0 ]] && echo passed || echo FAILED)"
exit $status
