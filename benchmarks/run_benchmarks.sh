#!/usr/bin/env bash
# Reproduces benchmarks/results/: the model zoo at batch 32, the depth sweep,
# RevNet-110 and ResNet-110 at batch 128, the largest batch within a memory
# budget and the float32 gradient drift, on
# this machine's CPU, then the Markdown tables and the plots. Takes about 5
# minutes on 2 cores.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/setup.sh"
for p in gnuplot-nox python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
cmake --build "$TORCHREV_BUILD" -j"$jobs" --target memory_bench drift_bench
bench="$TORCHREV_BUILD/benchmarks/memory_bench"
out="$TORCHREV_ROOT/benchmarks/results"
mkdir -p "$out"
threads=${THREADS:-2}

"$bench" --batch 32 --steps 3 --repeats 3 --threads "$threads" \
  --json "$out/cpu_zoo.json" | tee "$out/cpu_zoo.txt"
"$bench" --sweep-units 3,9,18,36,72 --sweep-modes reversible,stored,checkpointed \
  --batch 32 --steps 1 --repeats 3 --threads "$threads" \
  --json "$out/cpu_depth_sweep.json" | tee "$out/cpu_depth_sweep.txt"
"$bench" --models resnet110,revnet110,revnet38_inv,revnet110_inv,revnet164_inv \
  --modes reversible,stored,checkpointed,hybrid --batch 32 --steps 3 --repeats 3 \
  --threads "$threads" --json "$out/cpu_zoo_inv.json" | tee "$out/cpu_zoo_inv.txt"
"$bench" --models vit_mini,revvit_mini --modes reversible,stored,checkpointed \
  --depth 6,12,24 --batch 64 --steps 3 --repeats 3 --threads "$threads" \
  --json "$out/cpu_vit.json" | tee "$out/cpu_vit.txt"
"$bench" --models resnet110,revnet110,revnet110_inv --modes reversible,hybrid --batch 128 \
  --steps 1 --repeats 3 --threads "$threads" \
  --json "$out/cpu_batch128.json" | tee "$out/cpu_batch128.txt"
"$bench" --models resnet110,revnet110 --modes reversible,hybrid --steps 1 \
  --repeats 1 --budget-mib 256 --threads "$threads" \
  --json "$out/cpu_budget.json" | tee "$out/cpu_budget.txt"
# Gradient drift of deep float32 stages, with and without anchors.
"$TORCHREV_BUILD/benchmarks/drift_bench" --blocks 16,64,256 \
  --anchors 0,8,16,32 --scales 1,3 --threads "$threads" \
  --json "$out/cpu_drift.json" | tee "$out/cpu_drift.txt"
# The drift stages measure themselves in float32 and bfloat16.
"$TORCHREV_BUILD/benchmarks/drift_bench" --blocks 16,64,256 \
  --dtypes float32,bfloat16 --kinds conv,transformer --threads "$threads" \
  --json "$out/cpu_drift_dtypes.json" | tee "$out/cpu_drift_dtypes.txt"
# Peak RSS of building each model alone (the baseline for maxrss_kib).
for m in resnet110 revnet110; do
  "$bench" --models "$m" --modes reversible --steps 0 --json "$out/cpu_rss_$m.json" >/dev/null
done

/usr/bin/env python3 "$TORCHREV_ROOT/benchmarks/report.py" "$out"
(cd "$out" && gnuplot "$TORCHREV_ROOT/benchmarks/plot.gp")
echo "results in $out"
