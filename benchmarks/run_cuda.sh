#!/usr/bin/env bash
# Builds torchrev's tests and memory_bench against the LibTorch of the
# python3 torch on a CUDA machine, runs the _CUDA tests, the GPU memory and
# time benchmarks, then the CPU tests that fit the time left, and writes
# everything to $1 (default benchmarks/results/cuda):
#   env.txt            machine, compiler, LibTorch
#   build.log          configure and build
#   cuda_tests.txt     the _CUDA tests
#   cuda_zoo.{json,txt}, cuda_vit.{json,txt}, cuda_batch128.{json,txt},
#   cuda_depth_sweep.{json,txt}   memory_bench --device cuda
#   ctest_cpu.txt      the CPU tests on this LibTorch (the quick ones)
# BENCH_ONLY=1 skips the tests, TESTS_ONLY=1 the benchmarks.
#
# Needs CMake, a C++ compiler and nvcc. GoogleTest, fmt, CLI11,
# nlohmann_json, zlib and Gloo's headers come from the system, or from a
# prefix in TORCHREV_DEPS_PREFIX: Debian 12's packages unpacked there, e.g.
#   apt-get download libgtest-dev libgmock-dev libfmt-dev libfmt9 \
#     nlohmann-json3-dev libcli11-dev zlib1g-dev zlib1g libgloo-dev
#   for f in *.deb; do dpkg -x "$f" deps; done   # TORCHREV_DEPS_PREFIX=$PWD/deps/usr
# Each phase has a time limit, so that a slow one still leaves the results of
# the others.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/benchmarks/results/cuda}
build=${TORCHREV_BUILD:-$root/build-cuda}
jobs=${JOBS:-$(nproc)}
mkdir -p "$out"

torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
prefix="$torch_prefix"
if [[ -n ${TORCHREV_DEPS_PREFIX:-} ]]; then
  prefix="$prefix;$TORCHREV_DEPS_PREFIX"
  export CPATH="$TORCHREV_DEPS_PREFIX/include${CPATH:+:$CPATH}"
  export LIBRARY_PATH="$TORCHREV_DEPS_PREFIX/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$TORCHREV_DEPS_PREFIX/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  c++ --version | head -1
  cmake --version | head -1
  nvcc --version | tail -1
  echo "cores: $(nproc)"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

# BENCH_ONLY=1: only memory_bench; TESTS_ONLY=1: only the tests.
targets=torchrev_tests
[[ ${BENCH_ONLY:-0} == 1 ]] && targets=
benches=1
[[ ${TESTS_ONLY:-0} == 1 ]] && benches=
export targets
# Examples off: cifar_train's distributed build is not what this run checks
# (the tests that need it skip).
timeout 360 bash -c "
  cmake -S '$root' -B '$build' -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH='$prefix' -DTORCHREV_BUILD_EXAMPLES=OFF \
    -DTORCHREV_USE_TCMALLOC=OFF &&
  cmake --build '$build' -j$jobs --target memory_bench \${targets}
" >"$out/build.log" 2>&1
status=$?
tail -5 "$out/build.log"
if ((status != 0)); then
  grep -m20 -B2 -A8 'error' "$out/build.log"
  echo "build failed ($status)"
  exit 1
fi

tests="$build/tests/torchrev_tests"
bench="$build/benchmarks/memory_bench"
[[ -n $targets ]] &&
  timeout 120 "$tests" --gtest_filter='*_CUDA*' 2>&1 | tee "$out/cuda_tests.txt"

run_bench() { # name, timeout, args...
  local name=$1 limit=$2
  shift 2
  [[ -n $benches ]] || return 0
  timeout "$limit" "$bench" --device cuda --json "$out/$name.json" "$@" \
    2>&1 | tee "$out/$name.txt"
}
run_bench cuda_zoo 120 --batch 32 --steps 5 --repeats 3 \
  --models resnet32,resnet110,resnet164,revnet38,revnet110,revnet164,revnet38_inv,revnet110_inv,revnet164_inv
run_bench cuda_vit 90 --models vit_mini,revvit_mini \
  --modes reversible,stored,checkpointed --depth 6,12,24 --batch 64 \
  --steps 5 --repeats 3
run_bench cuda_batch128 60 --models resnet110,revnet110,revnet110_inv \
  --modes reversible,hybrid --batch 128 --steps 3 --repeats 3
run_bench cuda_depth_sweep 90 --sweep-units 3,9,18,36,72 \
  --sweep-modes reversible,stored,checkpointed --batch 32 --steps 3 --repeats 3

# The CPU tests on this LibTorch, the quick ones (the training, distributed
# and soak tests run a training binary or thousands of steps), 2 threads
# each: with LibTorch's default of one per core, 16 tests at once run
# 10 times slower.
[[ -n $targets ]] && (cd "$build" && OMP_NUM_THREADS=2 \
  timeout "${CTEST_LIMIT:-120}" ctest -j"$jobs" --timeout 100 \
  -E 'Distributed|CifarTrain|Torchrun|Soak|Training|Readme|Packaging|Lint|Docs|FuzzCorpus|_CUDA' \
  2>&1) | tail -40 | tee "$out/ctest_cpu.txt"
echo "results in $out"
