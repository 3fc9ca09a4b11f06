#!/usr/bin/env bash
# Builds torchrev and runs its whole test suite (CTest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cmake --build "$TORCHREV_BUILD" -j"$jobs"
if [[ -n ${TORCHREV_SANITIZE:-} ]]; then
  # Abort on the first finding; child processes (cifar_train) inherit these.
  supp=$TORCHREV_ROOT/tests/sanitizers
  # allocator_may_return_null: a test asks for an impossible allocation to
  # check that the memory meter survives the failure, which ASan would
  # otherwise turn into an abort.
  export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}
  export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$supp/lsan.supp:print_suppressions=0}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:suppressions=$supp/ubsan.supp}
fi
cd "$TORCHREV_BUILD"
ctest --output-on-failure -j"$jobs" "$@"
