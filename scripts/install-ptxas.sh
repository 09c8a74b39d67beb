#!/usr/bin/env bash
# Installs NVIDIA's ptxas (from the PyPI wheel nvidia-cuda-nvcc) into .tools/ptxas, where the
# tests and `fisherc inspect` find it. No GPU or CUDA installation needed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=13.5.37
TARGET=.tools/ptxas
PTXAS=$TARGET/nvidia/cu13/bin/ptxas

if [ -x "$PTXAS" ] && "$PTXAS" --version 2>/dev/null | grep -q "V${VERSION%.*}"; then
  exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "install-ptxas: installing python3-pip" >&2
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq python3-pip
fi

rm -rf "$TARGET"
# --target installs outside the system's Python, so PEP 668's guard does not apply
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
  --target "$TARGET" "nvidia-cuda-nvcc==$VERSION"
"$PTXAS" --version | tail -1
