#!/usr/bin/env bash
# glibc malloc against tcmalloc on one training benchmark, side by side and
# alternating, in one run: a memory_bench linked WITHOUT tcmalloc (configure
# with -DTORCHREV_USE_TCMALLOC=OFF), run as is and with tcmalloc preloaded.
# Usage: allocator_compare.sh MEMORY_BENCH [ROUNDS]
set -euo pipefail
bench=$1
rounds=${2:-3}
tcmalloc=$(ldconfig -p | awk '/libtcmalloc_minimal.so.4 /{lib = $NF} END {print lib}')
if ldd "$bench" | grep tcmalloc >/dev/null; then
  echo "$bench links tcmalloc already; build it with -DTORCHREV_USE_TCMALLOC=OFF" >&2
  exit 2
fi
args=(--models revnet110 --modes reversible --batch 128 --steps 3 --repeats 3 --threads 2)
echo "command: $bench ${args[*]}  (alternating: glibc, LD_PRELOAD=$tcmalloc)"
for ((r = 1; r <= rounds; ++r)); do
  for allocator in glibc tcmalloc; do
    if [[ $allocator == tcmalloc ]]; then
      line=$(LD_PRELOAD=$tcmalloc "$bench" "${args[@]}" 2>&1 | tail -1)
    else
      line=$("$bench" "${args[@]}" 2>&1 | tail -1)
    fi
    echo "round $r $allocator: $line"
  done
done
