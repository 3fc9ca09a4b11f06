#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang) and runs each for
# ${TORCHREV_FUZZ_SECONDS:-60} seconds from its seed corpus. New inputs go to
# a scratch corpus, not into the repository; a crash, leak, timeout or
# out-of-memory fails the script and leaves the input in the build folder.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${TORCHREV_FUZZ_SECONDS:-60}
build=${TORCHREV_FUZZ_BUILD:-$root/build-fuzz}

missing=()
for p in clang libclang-rt-dev zlib1g-dev cmake; do
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

CXX=clang++ cmake -S "$root/fuzz" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DTORCHREV_WERROR="${TORCHREV_WERROR:-OFF}" >/dev/null
cmake --build "$build" -j"$(nproc 2>/dev/null || echo 2)"
for target in cifar idx sealed; do
  scratch="$build/corpus-$target"
  mkdir -p "$scratch"
  echo "=== fuzz_$target for $seconds s ==="
  (cd "$build" && "./fuzz_$target" -max_total_time="$seconds" \
    -rss_limit_mb=1024 -malloc_limit_mb=256 -timeout=10 -print_final_stats=1 \
    "$scratch" "$root/fuzz/corpus/$target" 2>&1 | tail -n 12)
done
