#!/usr/bin/env bash
# Installs the real data the tests and the small experiments use: Debian's
# dataset-fashion-mnist (the full Fashion-MNIST, IDX files under
# /usr/share/datasets/fashion-mnist). Idempotent; needs apt (as root, or sudo).
set -euo pipefail

DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
echo "install-data: installing dataset-fashion-mnist" >&2
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq dataset-fashion-mnist
