#!/usr/bin/env bash
# Two fisherc builds timed on the same card in one device call: a kernel change's A/B. Builds
# nothing: BASE and NEW are binaries scripts/build-cuda.sh made here (copy the earlier one
# aside before rebuilding, e.g. .gpu/fisherc-<commit>; carry .gpu).
#
#   1. correctness of NEW: `fisherc check --backend cuda` of each CHECK_MODELS at CHECK_BATCH,
#      compiled with CHECK_FLAGS (every kernel node by node against the CPU reference, then
#      CHECK_STEPS noisy steps)
#   2. speed: `fisherc bench` of MODELS at BATCH (Fisher $FISHER, $VARIANT) with BASE, NEW,
#      BASE, NEW (alternating, so that a drift of the card's clocks falls on both), then each
#      of EXTRA's flag sets with NEW (e.g. EXTRA="--stages 3")
#   3. the table: each model's median step per binary and run, NEW / BASE, printed last
#
# $OUT (default /tmp/gpu-ab) gets machine.txt, check_<model>.txt, ab.md (the table) and
# runs.tar.gz (per run its bench log, JSON with every node's time, and Markdown: one file, as
# the device tool brings back only a few).
# Usage: BASE=.gpu/fisherc-6745c54 NEW=.gpu/fisherc EXTRA="--stages 3" scripts/gpu-ab.sh
# A dry run on a CPU machine: BACKEND=reference BATCH=8 MODELS=resnet20 CHECK_MODELS=
#   BASE=target/release/fisherc NEW=target/release/fisherc scripts/gpu-ab.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-ab}
BASE=${BASE:?BASE: the binary to compare against}
NEW=${NEW:-.gpu/fisherc}
BACKEND=${BACKEND:-cuda}
MODELS=${MODELS:-resnet44 vgg16}
BATCH=${BATCH:-4096}
FISHER=${FISHER:-exact}
VARIANT=${VARIANT:-fused-tc}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-1}
EXTRA=${EXTRA:-}
CHECK_MODELS=${CHECK_MODELS-vgg16}
CHECK_BATCH=${CHECK_BATCH:-8}
CHECK_STEPS=${CHECK_STEPS:-1}
CHECK_FLAGS=${CHECK_FLAGS---tensor-cores=3xtf32}
LIMIT=${LIMIT:-120}
mkdir -p "$OUT"
for f in "$BASE" "$NEW"; do
  [ -x "$f" ] || { echo "gpu-ab: $f missing: build it here (scripts/build-cuda.sh) and carry it" >&2; exit 1; }
done
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  echo "base $BASE, new $NEW"; } | tee "$OUT/machine.txt"

status=0
for model in $CHECK_MODELS; do
  art=$(mktemp -d)/$model
  {
    # shellcheck disable=SC2086 # flags are words
    "$NEW" compile "models/$model.toml" --batch "$CHECK_BATCH" --fisher "$FISHER" $CHECK_FLAGS \
      -o "$art" >/dev/null \
      && timeout "$LIMIT" "$NEW" check "$art" --backend "$BACKEND" --steps "$CHECK_STEPS"
  } >"$OUT/check_$model.txt" 2>&1
  result=$?
  [ $result = 0 ] || status=1
  echo "check $model b$CHECK_BATCH $FISHER $CHECK_FLAGS: $(tail -1 "$OUT/check_$model.txt") (exit $result)"
done

runs=("base:$BASE:" "new:$NEW:" "base:$BASE:" "new:$NEW:")
[ -n "$EXTRA" ] && runs+=("new $EXTRA:$NEW:$EXTRA")
i=0
for run in "${runs[@]}"; do
  IFS=: read -r label binary flags <<<"$run"
  i=$((i + 1))
  # shellcheck disable=SC2086 # flags are words
  timeout "$LIMIT" "$binary" bench $(printf 'models/%s.toml ' $MODELS) --batch "$BATCH" \
    --fisher "$FISHER" --variant "$VARIANT" $flags --backend "$BACKEND" --steps "$STEPS" \
    --warmup "$WARMUP" --json "$OUT/run$i.json" --markdown "$OUT/run$i.md" >"$OUT/run$i.log" 2>&1
  echo "run $i ($label): exit $?"
  echo "$label" >"$OUT/run$i.label"
done

python3 - "$OUT" "$i" <<'EOF' | tee "$OUT/ab.md"
import json, os, sys
out, runs = sys.argv[1], int(sys.argv[2])
times, labels = {}, []
for i in range(1, runs + 1):
    label = open(os.path.join(out, f"run{i}.label")).read().strip()
    labels.append(label)
    try:
        results = json.load(open(os.path.join(out, f"run{i}.json")))
    except (OSError, ValueError):
        continue
    for r in results:
        if r.get("error") is None:
            times.setdefault(r["model"], {}).setdefault(label, []).append(r["median_ms"])
columns = list(dict.fromkeys(labels))
print("| model | " + " | ".join(f"{c} ms" for c in columns) + " | new / base |")
print("|---" * (len(columns) + 2) + "|")
for model, by in times.items():
    cells = [" / ".join(f"{t:.1f}" for t in by.get(c, [])) or "-" for c in columns]
    ratio = "-"
    if by.get("base") and by.get("new"):
        ratio = f"{min(by['new']) / min(by['base']):.3f}"
    print(f"| {model} | " + " | ".join(cells) + f" | {ratio} |")
EOF
tar -czf "$OUT/runs.tar.gz" -C "$OUT" $(cd "$OUT" && ls run[0-9]*.*) && rm -f "$OUT"/run[0-9]*.*
exit $status
