#!/usr/bin/env bash
# Installs what torchrev needs on Debian 12 (only the packages that are
# missing), then configures the build directory. Sourced by train.sh and
# test.sh; needs root (or sudo) only when something is missing.
set -euo pipefail

TORCHREV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCHREV_BUILD=${TORCHREV_BUILD:-$TORCHREV_ROOT/build}

packages=(cmake g++ make ccache libtorch-dev libgtest-dev libfmt-dev
  libcli11-dev zlib1g-dev libgloo-dev nlohmann-json3-dev
  dataset-fashion-mnist)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    missing+=("$p")
done
if ((${#missing[@]})); then
  echo "torchrev: installing ${missing[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi

jobs=$(nproc 2>/dev/null || echo 2)
cmake -S "$TORCHREV_ROOT" -B "$TORCHREV_BUILD" -DCMAKE_BUILD_TYPE=Release \
  >/dev/null
