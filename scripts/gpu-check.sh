#!/usr/bin/env bash
# Issue #5's GPU check, one command for the device machine. Builds nothing: it runs the binary
# scripts/build-cuda.sh left in .gpu/ (carry that folder).
#
#   1. correctness: resnet20 and resnet44 at batch 32, exact Fisher (CHECK_KINDS: Fisher modes
#      or noises, e.g. "exact full-fisher-true"), fused, fused-tc (convolutions on TF32 tensor
#      cores) and unfused (CHECK_VARIANTS):
#      `fisherc check --backend cuda --steps 3`: every kernel node by node against the CPU
#      reference ops on the GPU's own inputs (bounds: 1e-4 elementwise, 1e-3 reductions and
#      convolutions), then 3 noisy steps against the CPU reference (1e-3).
#   2. timings: resnet44 and vgg16 at batch 4096, Fisher exact/none/a2g2, fused, fused-tc and
#      unfused:
#      `fisherc run --backend cuda --graph --profile`, median step time after warm-up (CUDA
#      events), then one step timed kernel by kernel (in the log).
#
# Every command runs under a time limit. $OUT (default /tmp/gpu-check) gets three files:
# machine.txt, log.txt (every command's output) and summary.txt, the table printed last.
# Usage: scripts/gpu-check.sh [--quick]   (--quick: fused exact timings only)
# RUNS="model:kind:variant ..." picks the timed configurations (kind: a Fisher mode or a noise); CHECK_MODELS= (set, empty)
# skips the checks, RUN_MODELS= the timings.
# A dry run on a CPU machine: BACKEND=executor CHECK_MODELS=small_cnn RUN_MODELS=small_cnn \
#   CHECK_BATCH=4 RUN_BATCH=8 FISHERC=target/release/fisherc scripts/gpu-check.sh --quick
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-check}
F=${FISHERC:-.gpu/fisherc}
BACKEND=${BACKEND:-cuda}
CHECK_MODELS=${CHECK_MODELS-resnet20 resnet44}
RUN_MODELS=${RUN_MODELS-resnet44 vgg16}
CHECK_KINDS=${CHECK_KINDS:-exact}
CHECK_VARIANTS=${CHECK_VARIANTS:-fused fused-tc unfused}
CHECK_BATCH=${CHECK_BATCH:-32}
RUN_BATCH=${RUN_BATCH:-4096}
LIMIT_CHECK=${LIMIT_CHECK:-150}
LIMIT_RUN=${LIMIT_RUN:-60}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
ART=$(mktemp -d)
LOG="$OUT/log.txt"
mkdir -p "$OUT"
: >"$LOG"
: >"$OUT/summary.txt"
[ -x "$F" ] || { echo "gpu-check: $F missing: run scripts/build-cuda.sh here and carry .gpu" >&2; exit 1; }
graph=""; [ "$BACKEND" = cuda ] && graph=--graph

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1; git rev-parse --short HEAD 2>/dev/null; } \
  | tee "$OUT/machine.txt"
# a row of the summary, kept in summary.txt at once (a run cut short keeps what it measured)
row() { echo "$1" >>"$OUT/summary.txt"; }

# runs "$@" under limit $1, its output appended to the log under a header; sets $status, $text
logged() {
  local limit=$1; shift
  echo "=== $* ===" >>"$LOG"
  text=$(timeout "$limit" "$@" 2>&1)
  status=$?
  printf '%s\n\n' "$text" >>"$LOG"
}

compile() { # model batch kind variant -> artifact dir on stdout (kind: a Fisher mode or a noise;
            # variant: fused, fused-tc or fused-tf32 (convolutions on tensor cores, 3xTF32 or
            # one TF32 product) or unfused)
  local dir="$ART/$1_b$2_$3_$4" flag="" kind="--noise"
  [ "$4" = unfused ] && flag=--unfused
  [ "$4" = fused-tc ] && flag=--tensor-cores=3xtf32
  [ "$4" = fused-tf32 ] && flag=--tensor-cores=tf32
  case $3 in none|exact|a2g2) kind="--fisher";; esac
  logged 120 "$F" compile "models/$1.toml" --batch "$2" "$kind" "$3" $flag --arch sm_90 -o "$dir"
  [ $status = 0 ] && echo "$dir"
}

verdict() { case $status in 0) echo "${1:-ok}";; 124) echo TIMEOUT;; *) echo "FAIL: $(tail -1 <<<"$text" | cut -c1-70)";; esac; }

for model in $CHECK_MODELS; do
  for kind in $CHECK_KINDS; do
  for variant in $CHECK_VARIANTS; do
    name="check $model b$CHECK_BATCH $kind $variant"
    if dir=$(compile "$model" "$CHECK_BATCH" "$kind" "$variant"); then
      logged "$LIMIT_CHECK" "$F" check "$dir" --backend "$BACKEND" --steps 3
      worst=$(awk '/^[a-z_0-9]+ +[0-9]+ +[0-9.e+-]+ +[0-9.e+-]+ +[0-9]+ +[0-9]+$/ { if ($3+0 > w) w = $3+0 } END { printf "%.1e", w }' <<<"$text")
      row "$(printf '%-48s %s (worst kernel error %s)' "$name" "$(verdict PASS)" "$worst")"
    else
      row "$(printf '%-48s compile failed (see log)' "$name")"
    fi
  done
  done
done

configs=${RUNS:-}
[ -n "$configs" ] || for model in $RUN_MODELS; do
  for fisher in exact none a2g2; do
    for variant in fused fused-tc unfused; do
      [ "${1:-}" = --quick ] && { [ $fisher = exact ] && [ $variant = fused ] || continue; }
      configs+=" $model:$fisher:$variant"
    done
  done
done
for config in $configs; do
  IFS=: read -r model fisher variant <<<"$config"
  name="run $model b$RUN_BATCH $fisher $variant"
  if dir=$(compile "$model" "$RUN_BATCH" "$fisher" "$variant"); then
    logged "$LIMIT_RUN" "$F" run "$dir" --backend "$BACKEND" $graph --steps "$STEPS" --warmup "$WARMUP" --profile
    median=$(awk '/^median step/ { print $3 " ms, " $8 " images/s" }' <<<"$text")
    row "$(printf '%-48s %s %s' "$name" "$(verdict)" "$median")"
  else
    row "$(printf '%-48s compile failed (see log)' "$name")"
  fi
done
rm -rf "$ART"

echo
cat "$OUT/summary.txt"
