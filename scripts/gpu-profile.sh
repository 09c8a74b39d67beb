#!/usr/bin/env bash
# Issue #7's "why": Nsight Compute on the heaviest GEMM kernel of each kind (forward,
# data gradient, weight gradient; fused or plain) of each model, one launch each, for the
# device machine. Builds nothing: it runs .gpu/fisherc (scripts/build-cuda.sh; carry .gpu).
#
# For each model: compiles it (batch $BATCH, exact Fisher, $VARIANT), picks from plan.json
# the kernel of each kind with the most multiplies in its main loop over the step, and runs
# one step under `ncu --clock-control none` (the card's clocks as found) profiling one launch
# of that kernel: speed of light, occupancy, launch statistics, warp states (the stall
# reasons), scheduler and memory sections. $OUT gets profile.txt (each kernel's details page
# and its stall reasons per issued instruction, largest first) and reports.tar.gz (the
# .ncu-rep files, for `ncu --import` or the Nsight Compute GUI).
#
# Usage: MODELS="resnet44 vgg16" scripts/gpu-profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-profile}
F=${FISHERC:-.gpu/fisherc}
MODELS=${MODELS:-resnet44 vgg16}
BATCH=${BATCH:-4096}
VARIANT_FLAG=${VARIANT_FLAG:---tensor-cores=3xtf32}
KINDS=${KINDS:-fused_conv_forward fused_dgrad_dgrad fused_wgrad_wgrad conv_dgrad_dgrad}
LIMIT=${LIMIT:-60}
NCU=${NCU:-ncu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
: >"$OUT/profile.txt"
[ -x "$F" ] || { echo "gpu-profile: $F missing: run scripts/build-cuda.sh here and carry .gpu" >&2; exit 1; }
command -v "$NCU" >/dev/null || { echo "gpu-profile: no $NCU on this machine" >&2; exit 1; }

# the kernel of each kind in $KINDS with the most main-loop multiplies over the step
heaviest() { # plan.json -> "name" lines
  python3 - "$1" $KINDS <<'EOF'
import collections, json, sys
plan = json.load(open(sys.argv[1]))
work = collections.Counter()
for launch in plan["launches"]:
    kernel = plan["kernels"][launch["kernel"]]
    loop = kernel.get("main_loop")
    if loop:
        blocks = launch["grid"][0] * launch["grid"][1]
        work[kernel["name"]] += blocks * launch["block"] // 32 * loop["trips"] * loop["multiplies"]
for kind in sys.argv[2:]:
    names = [n for n in work if n.startswith(kind + "_")]
    if names:
        print(max(names, key=work.__getitem__))
EOF
}

for model in $MODELS; do
  art="$WORK/$model"
  if ! "$F" compile "models/$model.toml" --batch "$BATCH" --fisher exact $VARIANT_FLAG -o "$art" \
       >"$WORK/$model.compile.txt" 2>&1; then
    echo "== $model: compile failed: $(tail -1 "$WORK/$model.compile.txt")" | tee -a "$OUT/profile.txt"
    continue
  fi
  for kernel in $(heaviest "$art/plan.json"); do
    rep="$WORK/${model}_${kernel}"
    echo "== $model $kernel" | tee -a "$OUT/profile.txt"
    timeout "$LIMIT" "$NCU" --clock-control none -k "regex:^${kernel}\$" -c 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis -o "$rep" -f \
      "$F" run "$art" --backend cuda --steps 1 >"$rep.log" 2>&1
    status=$?
    if [ $status != 0 ] || [ ! -f "$rep.ncu-rep" ]; then
      echo "ncu: exit $status: $(grep -m1 -i 'error' "$rep.log" || tail -1 "$rep.log")" | tee -a "$OUT/profile.txt"
      continue
    fi
    "$NCU" --import "$rep.ncu-rep" --page details >>"$OUT/profile.txt" 2>&1
    # the stall reasons, cycles per issued instruction, largest first
    "$NCU" --import "$rep.ncu-rep" --page raw --csv 2>/dev/null | python3 -c '
import csv, sys
rows = list(csv.reader(sys.stdin))
stalls = []
if len(rows) >= 3:
    for name, unit, value in zip(rows[0], rows[1], rows[2]):
        if "stalled" not in name:
            continue
        try:
            stalls.append((float(value.replace(",", "")), name, unit))
        except ValueError:
            pass
print("stall metrics, largest first:")
for value, name, unit in sorted(stalls, reverse=True)[:14]:
    print(f"  {value:10.2f} {unit:<8} {name}")
' >>"$OUT/profile.txt" 2>&1
  done
done
tar -czf "$OUT/reports.tar.gz" -C "$WORK" . && rm -rf "$WORK"
grep -E "^== |Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Warp Cycles Per Issued|^ +[0-9.]+ +smsp" \
  "$OUT/profile.txt" | head -80
