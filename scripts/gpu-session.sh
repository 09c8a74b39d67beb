#!/usr/bin/env bash
# Everything a device session should run, in order of importance, each part under its own time
# limit, in one call (the device budget is 15 minutes). Builds nothing: it runs .gpu/fisherc
# (scripts/build-cuda.sh; carry .gpu, with Fashion-MNIST in .gpu/fashion-mnist for part 3).
#
#   1. correctness (scripts/gpu-check.sh, checks only): every kernel of resnet20 and resnet44
#      at batch 32 against the CPU reference, node by node, then 3 noisy steps, for the exact
#      Fisher and full-Fisher noise, fused and unfused             (LIMIT_CHECK s, ~3 min)
#   2. speed (scripts/gpu-bench.sh): fisherc bench of resnet44 and vgg16 at batch 4096 and
#      PyTorch on the same card, side by side                       (LIMIT_BENCH s)
#   3. training (scripts/gpu-train.sh): ResNet20 on Fashion-MNIST, one epoch, lb-diagf
#                                                                   (LIMIT_TRAIN s)
#
# $OUT gets summary.txt (every part's table) and parts.tar.gz (each part's own files), so that
# the few files the device tool brings back hold everything. PARTS="check bench train" picks.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-session}
PARTS=${PARTS:-check bench train}
LIMIT_CHECK=${LIMIT_CHECK:-240}
LIMIT_BENCH=${LIMIT_BENCH:-300}
LIMIT_TRAIN=${LIMIT_TRAIN:-240}
WORK=$(mktemp -d)
mkdir -p "$OUT"
: >"$OUT/summary.txt"

part() { # name limit command... : runs it with OUT=$WORK/name, appends its output's tail
  local name=$1 limit=$2; shift 2
  mkdir -p "$WORK/$name"
  echo "=== $name ===" | tee -a "$OUT/summary.txt"
  OUT="$WORK/$name" timeout "$limit" "$@" >"$WORK/$name/console.txt" 2>&1
  echo "exit status $?" >>"$WORK/$name/console.txt"
  tail -25 "$WORK/$name/console.txt" | tee -a "$OUT/summary.txt"
}

for p in $PARTS; do
  case $p in
    check) part check "$LIMIT_CHECK" env CHECK_MODELS="resnet20 resnet44" \
             CHECK_KINDS="exact full-fisher-true" RUN_MODELS= scripts/gpu-check.sh ;;
    bench) part bench "$LIMIT_BENCH" scripts/gpu-bench.sh ;;
    train) part train "$LIMIT_TRAIN" scripts/gpu-train.sh ;;
    *) echo "gpu-session: unknown part '$p' (check, bench, train)" >&2 ;;
  esac
done
tar -czf "$OUT/parts.tar.gz" -C "$WORK" . && rm -rf "$WORK"
echo "gpu-session: summary.txt and parts.tar.gz in $OUT"
