#!/usr/bin/env bash
# Digests of every artifact `fisherc compile` makes for the shipped models at batch 4096: each
# Fisher mode and noise, fused and unfused, each precision and pipeline depth, sm_80 and sm_90.
# One line per variant: its flags, then the SHA-256 of module.ptx and of plan.json with its
# compile time removed (or the error, for a variant compile refuses). Two runs' outputs are equal
# exactly when every artifact is byte-identical, which is how a refactor shows it changed nothing:
#   scripts/artifact-matrix.sh > before.txt; ...; scripts/artifact-matrix.sh > after.txt
#   diff before.txt after.txt
# Usage: scripts/artifact-matrix.sh [MODEL...]   (default: every file in models/)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(models/*.toml)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
noises=("--fisher none" "--fisher exact" "--fisher a2g2" "--noise multiplicative"
        "--noise fisher-trace" "--noise full-fisher-empirical" "--noise full-fisher-true")
precisions=("" "--tensor-cores 3xtf32" "--tensor-cores tf32" "--tensor-cores 3xtf32 --stages 3"
            "--tensor-cores 3xtf32 --stages 4")
for model in "${models[@]}"; do
  for noise in "${noises[@]}"; do
    for fusion in "" "--unfused"; do
      for precision in "${precisions[@]}"; do
        for arch in sm_80 sm_90; do
          flags="$noise $fusion $precision --arch $arch"
          # shellcheck disable=SC2086
          if error=$(./target/release/fisherc compile "$model" --batch 4096 $flags -o "$out/a" 2>&1 >/dev/null); then
            ptx=$(sha256sum <"$out/a/module.ptx" | cut -c1-16)
            plan=$(grep -v '"compile_seconds"' "$out/a/plan.json" | sha256sum | cut -c1-16)
            echo "$model $flags: ptx $ptx plan $plan"
          else
            echo "$model $flags: error $(echo "$error" | tr '\n' ' ')"
          fi
          rm -rf "$out/a"
        done
      done
    done
  done
done
