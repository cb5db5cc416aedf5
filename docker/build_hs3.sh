#!/usr/bin/env bash
# The image of the stages that run our own code (data, eval, its; HF-engine stages on GPUs): this repository's
# dependencies on nvcr.io/nvidia/pytorch:26.06-py3 (docker/Dockerfile.hs3), imported as an enroot squashfs for
# pyxis: one command, on a machine with docker, enroot and network access (PyPI, nvcr.io).
#
#   docker/build_hs3.sh [OUTPUT_DIR]     (default: $HS3_CONTAINER_DIR, else /shared/containers)
#
# The output name is what conf/cluster/example.yaml's cluster.container_image expects; check it with
# ./launch.sh doctor cluster=NAME (it runs a job in the image and compares its packages with pyproject.toml and constraints.txt).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)
OUT_DIR=${1:-${HS3_CONTAINER_DIR:-/shared/containers}}
TAG=hs3:$VERSION
SQSH=$OUT_DIR/hs3-$VERSION-pytorch26.06.sqsh

# only what the Dockerfile copies: the image holds the dependencies, the jobs mount the repository
CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
mkdir "$CONTEXT/launcher" "$CONTEXT/hs3"
cp "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$CONTEXT/"
cp "$ROOT/launcher/image_probe.py" "$CONTEXT/launcher/"
cp "$ROOT/hs3/__init__.py" "$ROOT/hs3/versions.py" "$CONTEXT/hs3/"
docker build -f "$ROOT/docker/Dockerfile.hs3" -t "$TAG" "$CONTEXT"
mkdir -p "$OUT_DIR"
enroot import -o "$SQSH" "dockerd://$TAG"
echo "built $SQSH (cluster.container_image)"
