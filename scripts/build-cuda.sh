#!/usr/bin/env bash
# Builds the release binary with the CUDA backend (`--features cuda`) on a machine without
# CUDA, linking against the stub from scripts/cuda-stub.sh, and copies it to .gpu/fisherc for
# the GPU machine (see scripts/gpu-check.sh). Extra arguments go to cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."

stub=$(scripts/cuda-stub.sh)
# its own target directory: the plain build (no libcuda needed to run) stays as it is
CUDA_LIBRARY_PATH="$stub" cargo build --release --features cuda --target-dir target/cuda "$@"
mkdir -p .gpu
cp target/cuda/release/fisherc .gpu/fisherc
echo ".gpu/fisherc: $(du -h .gpu/fisherc | cut -f1), built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')"
