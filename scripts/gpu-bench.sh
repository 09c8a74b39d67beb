#!/usr/bin/env bash
# Issue #7's side-by-side, one command for the device machine. Builds nothing: it runs the
# binary scripts/build-cuda.sh left in .gpu/ (carry that folder), then PyTorch on the same
# card in the same call, and prints the two side by side.
#
#   1. `fisherc bench` on the cuda backend: MODELS at BATCH, Fisher none/exact/a2g2, VARIANTS
#      (fused; fused-tc and fused-tf32: convolutions on tensor cores, 3xTF32 and one TF32
#      product; unfused; median of STEPS after WARMUP,
#      CUDA graph replay, per-op profile) -> fisherc.json/.md
#   2. scripts/torch_bench.py: the same models and step in PyTorch (eager fp32 and tf32, plain,
#      a2g2 and exact; torch.compile tf32 plain) -> torch.jsonl
#   3. the side-by-side table -> side_by_side.md, printed last.
#
# Every part runs under a time limit. $OUT (default /tmp/gpu-bench) gets machine.txt,
# fisherc.log, fisherc.json, fisherc.md, torch.jsonl and side_by_side.md.
# Usage: MODELS="resnet44 vgg16" BATCH=4096 VARIANTS=fused,unfused scripts/gpu-bench.sh
# A dry run on a CPU machine (no PyTorch needed: TORCH= skips it):
#   BACKEND=reference MODELS=resnet20 BATCH=8 TORCH= FISHERC=target/release/fisherc scripts/gpu-bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-bench}
F=${FISHERC:-.gpu/fisherc}
BACKEND=${BACKEND:-cuda}
MODELS=${MODELS:-resnet44 vgg16}
BATCH=${BATCH:-4096}
FISHER=${FISHER:-none,exact,a2g2}
VARIANTS=${VARIANTS:-fused-tc,fused-tf32,fused}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-1}
TORCH=${TORCH-python3}
TORCH_MODES=${TORCH_MODES:-plain a2g2 exact}
LIMIT_FISHERC=${LIMIT_FISHERC:-300}
LIMIT_TORCH=${LIMIT_TORCH:-240}
mkdir -p "$OUT"
[ -x "$F" ] || { echo "gpu-bench: $F missing: run scripts/build-cuda.sh here and carry .gpu" >&2; exit 1; }

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1; git rev-parse --short HEAD 2>/dev/null; } \
  | tee "$OUT/machine.txt"

files=()
for m in $MODELS; do files+=("models/$m.toml"); done
timeout "$LIMIT_FISHERC" "$F" bench "${files[@]}" --batch "$BATCH" --fisher "$FISHER" \
  --variant "$VARIANTS" --backend "$BACKEND" --steps "$STEPS" --warmup "$WARMUP" \
  --json "$OUT/fisherc.json" --markdown "$OUT/fisherc.md" >"$OUT/fisherc.log" 2>&1
echo "fisherc bench: exit $? (log: fisherc.log)"

if [ -n "$TORCH" ]; then
  # shellcheck disable=SC2086
  timeout "$LIMIT_TORCH" $TORCH scripts/torch_bench.py --models $MODELS --batch "$BATCH" \
    --modes $TORCH_MODES --steps "$STEPS" --warmup "$WARMUP" >"$OUT/torch.jsonl" 2>"$OUT/torch.err"
  echo "torch_bench: exit $? (stderr: torch.err)"
else
  : >"$OUT/torch.jsonl"
fi

echo
# the configurations' table (the file goes on with every GEMM node's)
[ -s "$OUT/fisherc.md" ] && sed '/^$/q' "$OUT/fisherc.md"
echo
if [ -s "$OUT/fisherc.json" ]; then
  python3 scripts/torch_bench.py --side-by-side "$OUT/fisherc.json" "$OUT/torch.jsonl" | tee "$OUT/side_by_side.md"
fi
