#!/usr/bin/env bash
# Optimizer time and estimated traffic: `fisherc inspect --optimize` for each model and Fisher
# mode at batch 4096. Prints a Markdown table for benches/RESULTS.md.
# Usage: benches/optimize.sh [MODEL...]   (default: resnet44 vgg16 resnet44x2)
set -euo pipefail
cd "$(dirname "$0")/.."
models=("${@:-resnet44 vgg16 resnet44x2}")
cargo build --release --quiet
report=$(mktemp)
trap 'rm -f "$report"' EXIT
row="
import json, sys
model, fisher, seconds, path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
r = json.load(open(path))
o = r['optimized']
gb = lambda b: '%.1f GB' % (b / 1e9)
print('| %s | %s | %.3f | %.2f | %s → %s | %.3f | %d → %d |' % (model, fisher, o['seconds'], seconds,
      gb(r['est_bytes']), gb(o['est_bytes']), o['bytes_ratio'], r['kernels'], o['kernels']))
"
echo "| model | fisher | optimize (s) | whole inspect (s) | est. bytes before → after | ratio | kernels before → after |"
echo "|---|---|---|---|---|---|---|"
for model in ${models[*]}; do
  for fisher in none exact a2g2; do
    start=$(date +%s.%N)
    ./target/release/fisherc inspect "models/$model.toml" --batch 4096 --fisher "$fisher" --optimize --json >"$report"
    end=$(date +%s.%N)
    python3 -c "$row" "$model" "$fisher" "$(echo "$end - $start" | bc)" "$report"
  done
done
