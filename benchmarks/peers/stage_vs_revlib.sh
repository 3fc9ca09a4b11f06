#!/usr/bin/env bash
# torchrev against RevLib (Python, one autograd Function per half-block) on
# RevLib's benchmark shape: a stem convolution and one reversible stage of N
# basic blocks (16 + 16 channels, 32x32), batch 64, 1 thread, SGD with
# momentum, channels-last (`memory_bench --stage-blocks N` and
# revlib_stage.py build the same layers).
#
# Both use glibc's malloc: memory_bench is built here without tcmalloc (which
# also replaces operator new, past heaptrack's hooks, and is faster).
# Heap: heaptrack's peak heap consumption of a run with one training step
# after the warm-up, minus that of a run that only builds the model
# (--steps 0). heaptrack counts every malloc of either process the same way.
# For Python the model-only run's peak includes transient allocations of
# `import torch`, so RevLib's figure errs low, never high.
# Time: the median of ROUNDS (default 6) runs of each, one timed step after
# the warm-up per run, without heaptrack, alternating, so that both see the
# same machine load.
#
# Usage: benchmarks/peers/stage_vs_revlib.sh [blocks...]   (default: 18 72)
# Needs the torch 2.13.0 virtual environment of
# `TORCHREV_LIBTORCH=2.13.0 scripts/setup.sh` for Python; installs heaptrack
# (Debian) and revlib 1.7.2 (PyPI, into the cache) when missing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TORCHREV_BUILD=${TORCHREV_BUILD:-$(cd "$here/../.." && pwd)/build-peers-${TORCHREV_LIBTORCH:-system}}
# (setup.sh's own configure line would name tcmalloc: not this build.)
source "$here/../../scripts/setup.sh" >/dev/null
if ! dpkg-query -W -f='${Status}' heaptrack 2>/dev/null | grep -q "ok installed"; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends heaptrack >/dev/null
fi
cmake -S "$TORCHREV_ROOT" -B "$TORCHREV_BUILD" -DTORCHREV_USE_TCMALLOC=OFF \
  -DTORCHREV_BUILD_TESTS=OFF -DTORCHREV_BUILD_EXAMPLES=OFF |
  { grep '^-- torchrev:' || true; }
cmake --build "$TORCHREV_BUILD" -j"$jobs" --target memory_bench >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bench="$TORCHREV_BUILD/benchmarks/memory_bench"

cache=${TORCHREV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/torchrev}
python=${PEER_PYTHON:-$cache/venv-torch-2.13.0/bin/python}
[[ -x $python ]] || {
  echo "no Python with torch at $python: run TORCHREV_LIBTORCH=2.13.0" \
    "scripts/setup.sh, or set PEER_PYTHON" >&2
  exit 2
}
revlib=$cache/revlib-1.7.2
[[ -d $revlib/revlib ]] || "$python" -m pip install -q --no-deps \
  --disable-pip-version-check --target "$revlib" revlib==1.7.2
# (heaptrack must start Python itself, so revlib comes through the
# environment rather than through `env`.)
export PYTHONPATH=$revlib
rounds=${ROUNDS:-6}
blocks=("$@")
((${#blocks[@]})) || blocks=(18 72)

command_of() { # program steps blocks: sets the array `cmd`
  case $1 in
    torchrev) cmd=("$bench" --stage-blocks "$3" --sweep-modes reversible
      --batch 64 --threads 1 --steps "$2" --repeats 1) ;;
    revlib) cmd=("$python" -W ignore
      "$here/revlib_stage.py" --blocks "$3" --batch 64 --threads 1
      --steps "$2") ;;
  esac
}
heap_mb() { # program steps blocks: heaptrack's peak in MB (10^6 bytes)
  local out cmd
  command_of "$@"
  out=$(mktemp -d "$tmp/heap.XXXX")
  heaptrack -o "$out/h" "${cmd[@]}" >/dev/null 2>&1
  # .zst, or .gz where zstd is not installed
  heaptrack_print -f "$out"/h.* 2>/dev/null |
    sed -n 's/^peak heap memory consumption: \([0-9.]*\)\([KMG]\)$/\1 \2/p' |
    awk '{print $1 * ($2 == "K" ? 1e-3 : $2 == "G" ? 1e3 : 1)}'
  rm -rf "$out"
}
step_times() { # program steps blocks: the timed steps' seconds, one a line
  local cmd
  command_of "$@"
  "${cmd[@]}" 2>/dev/null | awk '
    $1 == "step_seconds" { print $2 }          # revlib_stage.py
    $1 ~ /^stage-/ { print $6 }'               # memory_bench table row
}
median() { sort -g | awk '{v[NR] = $1} END {
  print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }

echo "# $(date -u +%FT%TZ) $(nproc) cores; revlib 1.7.2 on torch" \
  "$("$python" -c 'import torch; print(torch.__version__)'); torchrev on" \
  "$(basename "$TORCHREV_BUILD") (glibc malloc); heap: MiB the training step" \
  "adds (heaptrack); step s: median of $rounds runs"
printf '%-9s %7s %16s %12s\n' program blocks "heap growth MiB" "step s"
for n in "${blocks[@]}"; do
  for program in torchrev revlib; do
    base=$(heap_mb "$program" 0 "$n")
    peak=$(heap_mb "$program" 1 "$n")
    [[ -n $base && -n $peak ]] || {
      echo "heaptrack gave no peak for $program" >&2
      exit 1
    }
    growth=$(awk -v a="$peak" -v b="$base" 'BEGIN {print (a - b) * 1e6 / 1048576}')
    eval "growth_$program=$growth"
  done
  : >"$tmp/torchrev"
  : >"$tmp/revlib"
  for ((r = 0; r < rounds; ++r)); do
    step_times torchrev 1 "$n" >>"$tmp/torchrev"
    step_times revlib 1 "$n" >>"$tmp/revlib"
  done
  for program in torchrev revlib; do
    growth_var=growth_$program
    printf '%-9s %7s %16.1f %12.3f\n' "$program" "$n" "${!growth_var}" \
      "$(median <"$tmp/$program")"
  done
done
