#!/usr/bin/env bash
# Installs what torchrev needs on Debian 12 (only the packages that are
# missing), then configures the build directory. Sourced by train.sh and
# test.sh; needs root (or sudo) only when something is missing.
#
# TORCHREV_LIBTORCH selects the LibTorch to build against:
#   system (default)  Debian's libtorch-dev (1.13.1, CPU)
#   2.13.0 (a version) the `torch` wheel of that version from PyPI, installed
#                     once into a cached virtual environment under
#                     ${TORCHREV_CACHE:-~/.cache/torchrev}; the wheels are
#                     CUDA builds, so configuring needs the CUDA toolkit
#                     (/usr/local/cuda), while the tests run on the CPU
#   /path/to/libtorch an unpacked libtorch zip (or any CMAKE_PREFIX_PATH
#                     holding share/cmake/Torch)
# TORCHREV_BUILD overrides the build directory (default: build for the system
# LibTorch, build-torch-<version or name> otherwise; -sanitize appended with
# TORCHREV_SANITIZE, see below).
set -euo pipefail

TORCHREV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCHREV_LIBTORCH=${TORCHREV_LIBTORCH:-system}
build_given=${TORCHREV_BUILD:+yes}

packages=(cmake g++ make ccache libgtest-dev libgmock-dev libfmt-dev libcli11-dev
  zlib1g-dev nlohmann-json3-dev dataset-fashion-mnist doxygen
  # The Lint.ClangFormat and Lint.ClangTidy tests.
  clang-format clang-tidy
  # tcmalloc for the examples and benchmarks (lower RSS, faster steps).
  libgoogle-perftools-dev
  # c10d's Gloo header includes Gloo's headers, which LibTorch does not ship.
  libgloo-dev)
if [[ $TORCHREV_LIBTORCH == system ]]; then
  # Debian's LibTorch does its matrix products (every Linear layer) through
  # libblas.so.3, which is the unoptimised reference BLAS unless an optimised
  # one is installed: OpenBLAS makes a transformer step 4x faster here.
  packages+=(libtorch-dev libopenblas0-openmp)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    missing+=("$p")
done
# The virtual environment for a PyPI LibTorch needs Python's venv module.
if [[ $TORCHREV_LIBTORCH != system && $TORCHREV_LIBTORCH != /* ]] &&
  ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  missing+=(python3-venv)
fi
if ((${#missing[@]})); then
  echo "torchrev: installing ${missing[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi

cmake_args=()
case $TORCHREV_LIBTORCH in
  system)
    TORCHREV_BUILD=${TORCHREV_BUILD:-$TORCHREV_ROOT/build}
    ;;
  /*)
    TORCHREV_BUILD=${TORCHREV_BUILD:-$TORCHREV_ROOT/build-torch-$(basename "$TORCHREV_LIBTORCH")}
    cmake_args+=("-DCMAKE_PREFIX_PATH=$TORCHREV_LIBTORCH")
    ;;
  *)
    [[ $TORCHREV_LIBTORCH =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]] || {
      echo "torchrev: TORCHREV_LIBTORCH must be 'system', a torch version" \
        "such as 2.13.0, or an absolute path; got '$TORCHREV_LIBTORCH'" >&2
      exit 2
    }
    cache=${TORCHREV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/torchrev}
    venv=$cache/venv-torch-$TORCHREV_LIBTORCH
    # The marker is written last: a half-finished install is redone.
    if [[ ! -f $venv/.torchrev-complete ]]; then
      echo "torchrev: installing torch==$TORCHREV_LIBTORCH from PyPI into" \
        "$venv (once; several GB)" >&2
      rm -rf "$venv"
      mkdir -p "$cache"
      python3 -m venv "$venv"
      "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        "torch==$TORCHREV_LIBTORCH"
      touch "$venv/.torchrev-complete"
    fi
    prefix=$("$venv/bin/python" -c \
      'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
    TORCHREV_BUILD=${TORCHREV_BUILD:-$TORCHREV_ROOT/build-torch-$TORCHREV_LIBTORCH}
    cmake_args+=("-DCMAKE_PREFIX_PATH=$prefix")
    ;;
esac
# TORCHREV_WERROR=ON makes warnings in torchrev's own code errors (CI sets it).
# TORCHREV_SANITIZE=address,undefined (or any -fsanitize= list) builds the
# tests and examples with those sanitizers into <build>-sanitize, without the
# benchmarks; scripts/test.sh then sets the sanitizers' runtime options.
if [[ -n ${TORCHREV_SANITIZE:-} ]]; then
  [[ -n $build_given ]] || TORCHREV_BUILD=$TORCHREV_BUILD-sanitize
  sanitize_args=(-DTORCHREV_SANITIZE="$TORCHREV_SANITIZE"
    -DTORCHREV_BUILD_BENCHMARKS=OFF)
else
  sanitize_args=(-DTORCHREV_SANITIZE=)
fi

# The wheels and the CUDA libtorch zips are CUDA builds: their CMake package
# looks for the CUDA toolkit even where no GPU is present.
if [[ $TORCHREV_LIBTORCH != system && -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=$PATH:/usr/local/cuda/bin
  cmake_args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi

jobs=$(nproc 2>/dev/null || echo 2)
# Shows only torchrev's own summary line (which LibTorch, which C++).
# The parts are asked for explicitly, so that a missing dependency is an
# error here rather than a skipped part.
cmake -S "$TORCHREV_ROOT" -B "$TORCHREV_BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DTORCHREV_BUILD_TESTS=ON -DTORCHREV_BUILD_EXAMPLES=ON \
  -DTORCHREV_BUILD_BENCHMARKS=ON -DTORCHREV_WERROR="${TORCHREV_WERROR:-OFF}" \
  "${cmake_args[@]}" "${sanitize_args[@]}" | { grep '^-- torchrev:' || true; }
