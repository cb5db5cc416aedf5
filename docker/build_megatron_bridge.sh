#!/usr/bin/env bash
# The sft / import / export container of engine=megatron: Megatron-Bridge's own Dockerfile at the
# pinned commit (docker/Dockerfile.ci, target megatron_bridge, on nvcr.io/nvidia/pytorch:26.06-py3),
# with its Megatron-LM submodule (megatron-core 0.19), imported as an enroot squashfs for pyxis.
#
#   docker/build_megatron_bridge.sh [OUTPUT_DIR]     (default: $HS3_CONTAINER_DIR, else /shared/containers)
#
# Needs docker (with buildx) and enroot on a machine with network access; the image is ~30 GB.
# The output name is what conf/engine/megatron.yaml's megatron.container expects.
set -euo pipefail
COMMIT=51885cf132b2814188b6855c25a8588254274c2a   # v0.6.0 = megatron.megatron_bridge_commit
OUT_DIR=${1:-${HS3_CONTAINER_DIR:-/shared/containers}}
TAG=megatron-bridge:v0.6.0-${COMMIT:0:7}
SQSH=$OUT_DIR/megatron-bridge-v0.6.0-${COMMIT:0:7}.sqsh
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

git clone --filter=blob:none https://github.com/NVIDIA-NeMo/Megatron-Bridge "$WORK/Megatron-Bridge"
cd "$WORK/Megatron-Bridge"
git checkout --quiet "$COMMIT"
git submodule update --init --depth 1 3rdparty/Megatron-LM   # cd4afffa: megatron-core 0.19
docker buildx build -f docker/Dockerfile.ci --target megatron_bridge -t "$TAG" --load .
mkdir -p "$OUT_DIR"
enroot import -o "$SQSH" "dockerd://$TAG"
echo "built $SQSH (megatron.container); check: srun --container-image=$SQSH python -c 'import megatron.bridge, megatron.core; print(megatron.bridge.__version__, megatron.core.__version__)'"
