#!/usr/bin/env bash
# Builds torchrev and runs its whole test suite (CTest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cmake --build "$TORCHREV_BUILD" -j"$jobs"
cd "$TORCHREV_BUILD"
ctest --output-on-failure -j"$jobs" "$@"
