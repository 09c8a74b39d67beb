#!/usr/bin/env bash
# Installs what the tests, the small experiments and `fisherc plot` need from the system:
# Debian's dataset-fashion-mnist (the full Fashion-MNIST, IDX files under
# /usr/share/datasets/fashion-mnist) and fonts-dejavu-core (the plots' text).
# Idempotent; needs apt (as root, or sudo).
set -euo pipefail

missing=()
DATA=/usr/share/datasets/fashion-mnist
[ -f "$DATA/train-images-idx3-ubyte.gz" ] && [ -f "$DATA/t10k-labels-idx1-ubyte.gz" ] \
  || missing+=(dataset-fashion-mnist)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
[ ${#missing[@]} = 0 ] && exit 0

SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
echo "install-data: installing ${missing[*]}" >&2
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}"
