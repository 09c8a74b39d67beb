#!/usr/bin/env bash
# CPU reference step times: `fisherc step` for each model and Fisher mode, median over steps.
# Usage: benches/cpu_step.sh [BATCH] [STEPS] [MODEL...]   (defaults: 16, 10, resnet20 resnet44)
# Prints a Markdown table for benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-16}
steps=${2:-10}
shift $(( $# > 2 ? 2 : $# ))
models=("${@:-resnet20 resnet44}")
cargo build --release --quiet
echo "| model | batch | fisher | median step (s) | images/s |"
echo "|---|---|---|---|---|"
for model in ${models[*]}; do
  for fisher in none exact a2g2; do
    line=$(./target/release/fisherc step "models/$model.toml" --batch "$batch" --steps "$steps" \
      --seed 1 --fisher "$fisher" | tail -n 1)
    # "median step 0.123 s, 456.7 images/s"
    read -r _ _ seconds _ rate _ <<<"${line//,/}"
    echo "| $model | $batch | $fisher | $seconds | $rate |"
  done
done
