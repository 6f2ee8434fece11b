#!/usr/bin/env bash
# The GPU checks of issue 3 in three slices, each sized for one 10-minute job on one H100:
#   bash bench/gpu_checks.sh 1 OUT   CUDA tests (graphs, bf16, compile), then the Qwen2.5-3B shape at batch 64:
#                                    greedy identity, our sampler vs generate, a kernel profile
#   bash bench/gpu_checks.sh 2 OUT   the Qwen3-4B shape at batch 16, the 3B shape at batch 16 and 256
#   bash bench/gpu_checks.sh 3 OUT   the LoRA updates and a full CORE step for the pair (plain, then with
#                                    --decoder compiled)
# Each slice writes its JSON (and a log) under OUT.
set -euo pipefail
slice=${1:?slice 1, 2 or 3}
out=${2:?output folder}
mkdir -p "$out"
py=${PYTHON:-python3}
bench() { "$py" bench/bench_core.py "$@" ${BENCH_EXTRA:-}; }  # BENCH_EXTRA="--tiny ...": a CPU smoke run
case "$slice" in
  1) "$py" -m pytest -q test_core.py -k "cuda or fast or bfloat16 or compile" 2>&1 | tail -5
     bench --models qwen2.5-3b --parts greedy sampler --batches 64 --profile --out "$out/slice1.json" ;;
  2) bench --models qwen3-4b --parts greedy sampler --batches 16 --out "$out/slice2a.json"
     bench --models qwen2.5-3b --parts sampler --batches 16 256 --no-static --out "$out/slice2b.json" ;;
  3) bench --parts update step --out "$out/slice3a.json"
     bench --parts step --decoder compiled --out "$out/slice3b.json" ;;
  *) echo "slice must be 1, 2 or 3" >&2; exit 2 ;;
esac 2>&1 | tee "$out/slice$slice.log"
