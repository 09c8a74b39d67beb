#!/usr/bin/env bash
# Whole-compile time and memory plan: `fisherc compile` (build the step, optimise, lower every
# node, plan memory, render PTX, write the artifact) for each model and Fisher mode at batch
# 4096, fused and unfused. Prints a Markdown table for benches/RESULTS.md.
# Usage: benches/compile.sh [MODEL...]   (default: resnet20 resnet44 resnet44x2 vgg16)
set -euo pipefail
cd "$(dirname "$0")/.."
models=("${@:-resnet20 resnet44 resnet44x2 vgg16}")
cargo build --release --quiet
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
row="
import json, os, sys
model, fisher, variant, seconds, dir = sys.argv[1:6]
p = json.load(open(os.path.join(dir, 'plan.json')))
gib = lambda b: '%.2f GiB' % (b / 2**30)
ptx = os.path.getsize(os.path.join(dir, 'module.ptx')) / 2**10
print('| %s | %s | %s | %.2f | %.2f | %d | %d | %.0f KiB | %s | %s |' % (model, fisher, variant,
      float(seconds), p['compile_seconds'], len(p['kernels']), len(p['launches']), ptx,
      gib(p['persistent_bytes']), gib(p['arena_bytes'])))
"
echo "| model | fisher | variant | whole command (s) | compile (s) | kernels | launches | PTX | persistent | arena |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for model in ${models[*]}; do
  for fisher in none exact a2g2; do
    for variant in fused unfused; do
      flag=$([ "$variant" = unfused ] && echo --unfused || true)
      start=$(date +%s.%N)
      ./target/release/fisherc compile "models/$model.toml" --batch 4096 --fisher "$fisher" $flag \
        -o "$out/a" >/dev/null
      end=$(date +%s.%N)
      python3 -c "$row" "$model" "$fisher" "$variant" "$(echo "$end - $start" | bc)" "$out/a"
    done
  done
done
