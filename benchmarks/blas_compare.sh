#!/usr/bin/env bash
# How the BLAS behind Debian's LibTorch 1.13 sets the speed of a transformer:
# 30 training steps of vit_mini with the reference BLAS, with OpenBLAS as
# installed (its kernels chosen from the CPU model), and with OpenBLAS told
# the core type. Writes benchmarks/results/cpu_blas.txt, or the file named
# as the first argument.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
train=${TORCHREV_BUILD:-$root/build}/examples/cifar/cifar_train
out=${1:-$root/benchmarks/results/cpu_blas.txt}
reference=/usr/lib/x86_64-linux-gnu/blas # Debian's reference libblas.so.3
run() { # label, then env assignments
  local label=$1
  shift
  local line
  line=$(env OPENBLAS_VERBOSE=2 "$@" "$train" --model vit_mini --quiet \
    --max-steps 30 2>&1 | grep -E "images/s in training|^Core:" | tr '\n' ' ')
  echo "$label: $line"
}
{
  echo "# command: benchmarks/blas_compare.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  run "reference BLAS" LD_LIBRARY_PATH=$reference
  run "OpenBLAS, detected core"
  if grep -qw avx2 /proc/cpuinfo; then
    run "OpenBLAS, OPENBLAS_CORETYPE=Haswell" OPENBLAS_CORETYPE=Haswell
  fi
  # Told a core type whose instructions the CPU lacks, OpenBLAS dies with
  # SIGILL: the AVX-512 kernels only where the CPU has AVX-512.
  if grep -qw avx512f /proc/cpuinfo; then
    run "OpenBLAS, OPENBLAS_CORETYPE=SkylakeX" OPENBLAS_CORETYPE=SkylakeX
  else
    echo "OpenBLAS, OPENBLAS_CORETYPE=SkylakeX: skipped (this CPU has no AVX-512)"
  fi
} | tee "$out.tmp"
mv "$out.tmp" "$out"
