#!/usr/bin/env bash
# scripts/openblas_coretype.sh against fake programs (which report the core
# OpenBLAS chose, as OPENBLAS_VERBOSE=2 makes it) and fake CPU flags.
set -euo pipefail
script=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../scripts" && pwd)/openblas_coretype.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

program() { # name, the core it detects ("" for a BLAS that reports none)
  local path=$work/$1
  if [[ -n $2 ]]; then
    # As OpenBLAS does, it takes OPENBLAS_CORETYPE over its own choice.
    # shellcheck disable=SC2016 # expanded by the fake program
    printf '#!/bin/sh\n[ "$OPENBLAS_VERBOSE" = 2 ] && echo "Core: ${OPENBLAS_CORETYPE:-%s}" >&2\necho usage\n' "$2" >"$path"
  else
    printf '#!/bin/sh\necho usage\n' >"$path"
  fi
  chmod +x "$path"
  echo "$path"
}
cpu() { # name, flags
  printf 'processor\t: 0\nflags\t\t: %s\n\nprocessor\t: 1\nflags\t\t: %s\n' \
    "$2" "$2" >"$work/$1"
  echo "$work/$1"
}

failures=0
expect() { # description, expected output, program, cpuinfo
  local got
  got=$(bash "$script" "$3" "$4")
  if [[ $got == "$2" ]]; then
    echo "ok: $1"
  else
    echo "FAIL: $1: expected '$2', got '$got'"
    failures=$((failures + 1))
  fi
}

skylake=$(cpu skylake "fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl")
knl=$(cpu knl "fpu sse2 avx avx2 fma avx512f avx512cd") # AVX-512 F without BW
epyc=$(cpu epyc "fpu sse2 avx avx2 fma")
old=$(cpu old "fpu sse2 sse4_2 avx")
prescott=$(program prescott Prescott)
zen=$(program zen Zen)
reference=$(program reference "")

expect "unknown CPU with AVX-512: SkylakeX" SkylakeX "$prescott" "$skylake"
expect "AVX-512 F without BW: Haswell" Haswell "$prescott" "$knl"
expect "unknown CPU with AVX2: Haswell" Haswell "$prescott" "$epyc"
expect "unknown CPU without AVX2: nothing" "" "$prescott" "$old"
expect "a core OpenBLAS knows: nothing" "" "$zen" "$skylake"
expect "another BLAS: nothing" "" "$reference" "$skylake"
# A core type already in the environment must not hide OpenBLAS's own choice.
OPENBLAS_CORETYPE=Haswell expect "OPENBLAS_CORETYPE set: still detected" \
  SkylakeX "$prescott" "$skylake"
exit $((failures > 0))
