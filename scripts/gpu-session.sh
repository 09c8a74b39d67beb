#!/usr/bin/env bash
# Everything a device session should run, in order of importance, each part under its own time
# limit; with the default limits (590 s in all) it fits one 10-minute device call (all five
# parts took 287 s on the H200, 2026-11-28, before VGG16 joined the check). Builds
# nothing: it runs .gpu/fisherc (scripts/build-cuda.sh; carry .gpu, with Fashion-MNIST in
# .gpu/fashion-mnist for part 3).
#
#   1. correctness (scripts/gpu-check.sh, checks only), every kernel node by node against the
#      CPU reference, then 3 noisy steps: resnet20 at batch 32, exact Fisher and full-Fisher
#      noise, fused, fused-tc (tensor cores) and unfused; resnet44, exact, fused-tc, fused and
#      fused-tf32 (one TF32 product: its own bounds); vgg16 at batch 8, exact, fused-tc and
#      unfused (max pooling: a step out of bounds is run again given the GPU's forward pass);
#      last, resnet20 at batch 32 with K-FAC noise, fused-tc (its factor and noise kernels)
#                                                                   (LIMIT_CHECK s)
#   2. speed (scripts/gpu-bench.sh): fisherc bench of resnet44 and vgg16 at batch 4096 (Fisher
#      none and exact; fused-tc and fused-tf32; fp32 FMA was timed on 2026-11-27) and PyTorch
#      on the same card, side by side
#                                                                   (LIMIT_BENCH s)
#   2b. the GEMM pipeline's depth: the exact fused-tc step again with `--stages 3` (three
#      slices in flight; the default, 2, double-buffers), beside part 2's default
#                                                                   (LIMIT_STAGES s)
#   3. training (scripts/gpu-train.sh): ResNet20 on Fashion-MNIST, one epoch, lb-diagf
#                                                                   (LIMIT_TRAIN s)
#   4. why (scripts/gpu-profile.sh): Nsight Compute on the heaviest GEMM kernel of each kind
#      of resnet44 and vgg16 at batch 4096 (stall reasons, occupancy)
#                                                                   (LIMIT_PROFILE s)
#
# $OUT gets summary.txt (every part's table) and parts.tar.gz (each part's own files), so that
# the few files the device tool brings back hold everything. PARTS="check bench stages train
# profile" picks.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-session}
PARTS=${PARTS:-check bench stages train profile}
LIMIT_CHECK=${LIMIT_CHECK:-200}
LIMIT_BENCH=${LIMIT_BENCH:-210}
LIMIT_STAGES=${LIMIT_STAGES:-50}
LIMIT_TRAIN=${LIMIT_TRAIN:-50}
LIMIT_PROFILE=${LIMIT_PROFILE:-80}
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
    check) part check "$LIMIT_CHECK" bash -c '
             CHECK_MODELS=resnet20 CHECK_KINDS="exact full-fisher-true" RUN_MODELS= scripts/gpu-check.sh
             OUT=$OUT/resnet44 CHECK_MODELS=resnet44 CHECK_VARIANTS="fused-tc fused fused-tf32" RUN_MODELS= \
               scripts/gpu-check.sh
             OUT=$OUT/vgg16 CHECK_MODELS=vgg16 CHECK_BATCH=8 CHECK_VARIANTS="fused-tc unfused" RUN_MODELS= \
               scripts/gpu-check.sh
             OUT=$OUT/kfac CHECK_MODELS=resnet20 CHECK_KINDS=kfac CHECK_VARIANTS=fused-tc RUN_MODELS= \
               scripts/gpu-check.sh' ;;
    bench) part bench "$LIMIT_BENCH" env FISHER=none,exact VARIANTS=fused-tc,fused-tf32 STEPS=3 \
             WARMUP=1 LIMIT_FISHERC=80 LIMIT_TORCH=125 TORCH_MODES="plain a2g2" scripts/gpu-bench.sh ;;
    stages) part stages "$LIMIT_STAGES" bash -c '
             .gpu/fisherc bench models/resnet44.toml models/vgg16.toml --batch 4096 --fisher exact \
               --variant fused-tc --stages 3 --backend cuda --steps 3 --warmup 1 --no-profile \
               --json "$OUT/stages3.json" --markdown "$OUT/stages3.md" >"$OUT/stages3.log" 2>&1
             echo "fisherc bench --stages 3: exit $?"; sed "/^$/q" "$OUT/stages3.md"' ;;
    train) part train "$LIMIT_TRAIN" scripts/gpu-train.sh ;;
    profile) part profile "$LIMIT_PROFILE" env LIMIT=20 scripts/gpu-profile.sh ;;
    *) echo "gpu-session: unknown part '$p' (check, bench, stages, train, profile)" >&2 ;;
  esac
done
tar -czf "$OUT/parts.tar.gz" -C "$WORK" . && rm -rf "$WORK"
echo "gpu-session: summary.txt and parts.tar.gz in $OUT"
