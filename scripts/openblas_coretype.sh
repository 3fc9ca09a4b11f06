#!/usr/bin/env bash
# Prints the OPENBLAS_CORETYPE to run PROGRAM with on this CPU, or nothing
# when OpenBLAS should keep its own choice.
#
# Debian 12's OpenBLAS (0.3.21, behind Debian's LibTorch) picks its kernels
# from the CPU model and falls back to its slowest ones, "Prescott", for
# models it does not know, as on some virtual Xeons. Naming the core type
# made vit_mini training there about 2.1x faster
# (benchmarks/results/cpu_blas.txt). Only a core type whose instructions the
# CPU has is printed: told SkylakeX without AVX-512, OpenBLAS dies with
# "Illegal instruction".
#
# Usage: openblas_coretype.sh PROGRAM [CPUINFO]
#   PROGRAM  a program that loads the BLAS (it runs once as
#            `OPENBLAS_VERBOSE=2 PROGRAM --help`, which makes OpenBLAS name
#            its core on stderr; nothing is printed for another BLAS)
#   CPUINFO  where to read the CPU's flags (default /proc/cpuinfo)
set -euo pipefail
program=${1:?usage: openblas_coretype.sh PROGRAM [CPUINFO]}
cpuinfo=${2:-/proc/cpuinfo}

core=$(env -u OPENBLAS_CORETYPE OPENBLAS_VERBOSE=2 "$program" --help 2>&1 \
  >/dev/null | sed -n 's/^Core: *//p' | head -n1) || true
[[ $core == Prescott ]] || exit 0

# No flags line, or no file: no core type (never a failure that would stop
# the training run that asked).
flags=" $(grep -m1 '^flags' "$cpuinfo" 2>/dev/null | cut -d: -f2- || true) "
has() {
  local flag
  for flag; do
    [[ $flags == *" $flag "* ]] || return 1
  done
}
# SkylakeX's kernels use AVX-512 F, BW, DQ and VL; Haswell's AVX2 and FMA.
if has avx512f avx512bw avx512dq avx512vl; then
  echo SkylakeX
elif has avx2 fma; then
  echo Haswell
fi
