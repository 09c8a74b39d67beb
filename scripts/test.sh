#!/usr/bin/env bash
# Every test of the workspace, including those that assemble the generated PTX with ptxas
# (installed first, into .tools/) and those on the real Fashion-MNIST (installed first, by
# apt). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-ptxas.sh
scripts/install-data.sh
cargo test --workspace "$@" -- --include-ignored
