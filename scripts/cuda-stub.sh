#!/usr/bin/env bash
# Makes a stub libcuda (every driver function cust_raw declares, doing nothing) in
# .tools/cuda-stub/lib64, so that `cargo build --features cuda` links on a machine without
# CUDA. The binary finds the real libcuda.so.1 at run time on a GPU machine; the stub is never
# loaded there. Prints the directory to pass as CUDA_LIBRARY_PATH. Needs cc.
set -euo pipefail
cd "$(dirname "$0")/.."

STUB=.tools/cuda-stub
cargo fetch --quiet
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
sources=$(find "$registry" -maxdepth 2 -type d -name 'cust_raw-*' | sort | tail -1)
if [ -z "$sources" ]; then
  echo "cuda-stub: cust_raw's sources are not in $registry (cargo fetch failed?)" >&2
  exit 1
fi
mkdir -p "$STUB/lib64"
symbols=$(grep -oh "pub fn cu[A-Za-z0-9_]*" -r "$sources/src" | sed 's/pub fn //' | sort -u)
for s in $symbols; do echo "void $s(void) {}"; done > "$STUB/stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/lib64/libcuda.so" "$STUB/stub.c"
echo "$PWD/$STUB"
