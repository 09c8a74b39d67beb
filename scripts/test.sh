#!/usr/bin/env bash
# Every test of the workspace, including those that assemble the generated PTX with ptxas
# (installed first, into .tools/) and those on the real Fashion-MNIST (installed first, by
# apt). In the release profile: it reuses the main job's build (`cargo run --release`) of every
# dependency and of the fisherc binary, and the CPU reference runs whole training steps fast.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-ptxas.sh
scripts/install-data.sh
cargo test --workspace --release "$@" -- --include-ignored
