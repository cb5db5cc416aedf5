#!/usr/bin/env bash
# The sft / import / export image of engine=megatron (docker/Dockerfile.megatron_bridge: Megatron-Bridge 0.6.2 and
# megatron-core 0.19.2 from PyPI, sha256-checked, on nvcr.io/nvidia/pytorch:26.06-py3), imported as an enroot
# squashfs for pyxis: one command, on a machine with docker, enroot and network access (PyPI, GitHub, nvcr.io).
#
#   docker/build_megatron_bridge.sh [OUTPUT_DIR]     (default: $HS3_CONTAINER_DIR, else /shared/containers)
#
# The output name is what conf/engine/megatron.yaml's megatron.container expects.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION=$(sed -n 's/^ARG MEGATRON_BRIDGE_VERSION=//p' "$ROOT/docker/Dockerfile.megatron_bridge")
OUT_DIR=${1:-${HS3_CONTAINER_DIR:-/shared/containers}}
TAG=megatron-bridge:$VERSION
SQSH=$OUT_DIR/megatron-bridge-$VERSION-pytorch26.06.sqsh

docker build -f "$ROOT/docker/Dockerfile.megatron_bridge" -t "$TAG" "$ROOT/docker"
mkdir -p "$OUT_DIR"
enroot import -o "$SQSH" "dockerd://$TAG"
echo "built $SQSH (megatron.container); check: srun --container-image=$SQSH python -c 'import megatron.bridge, megatron.core; print(megatron.bridge.__version__, megatron.core.__version__)'"
