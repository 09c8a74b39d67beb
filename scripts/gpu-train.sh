#!/usr/bin/env bash
# Issue #6's GPU run, one command for the device machine: ResNet20 on Fashion-MNIST for one
# epoch with lb-diagf (experiments/fashion_resnet20_lb_diagf.toml) on the CUDA backend, the
# state counted for NaN and infinite values on the device every 5 steps. Builds
# nothing: it runs .gpu/fisherc (scripts/build-cuda.sh) on the data in .gpu/fashion-mnist
# (copy /usr/share/datasets/fashion-mnist/*.gz there and carry .gpu).
# The same experiment on the CPU here: fisherc train --config experiments/fashion_resnet20_lb_diagf.toml
# $OUT (default /tmp/gpu-train) gets train.txt (the run's output) and metrics.jsonl; the run
# directory itself (checkpoint included) stays in $RUN.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-train}
F=${FISHERC:-.gpu/fisherc}
DATA=${DATA:-.gpu/fashion-mnist}
BACKEND=${BACKEND:-cuda}
LIMIT=${LIMIT:-240}
RUN=${RUN:-/tmp/gpu-train-run}
mkdir -p "$OUT"
[ -x "$F" ] || { echo "gpu-train: $F missing: run scripts/build-cuda.sh here and carry .gpu" >&2; exit 1; }
[ -f "$DATA/train-images-idx3-ubyte.gz" ] || { echo "gpu-train: no Fashion-MNIST in $DATA" >&2; exit 1; }

rm -rf "$RUN"
timeout "$LIMIT" "$F" train --config experiments/fashion_resnet20_lb_diagf.toml \
  --backend "$BACKEND" --set "data.dir=$DATA" --run-dir "$RUN" --check-every 5 "$@" 2>&1 | tee "$OUT/train.txt"
status=${PIPESTATUS[0]}
cp "$RUN/metrics.jsonl" "$OUT/" 2>/dev/null
echo "gpu-train: exit status $status"
exit "$status"
