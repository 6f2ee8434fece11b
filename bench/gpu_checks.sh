#!/usr/bin/env bash
# The GPU checks in one call (about 6 minutes on one H100/H200, estimated: not yet timed on a GPU):
#   bash bench/gpu_checks.sh OUT
# 0. the header bench/header.py prints: the command, date, core.py's sha256 and git commit, GPU, versions;
# 1. the CUDA tests of test_core.py (the graph sampler against the reference loop, bf16; a capture refused by
#    a host read inside it: that model warns and decodes without graphs, the other model then captures on the
#    same memory pool, both give the reference loop's tokens, and a CORE step with both updates goes on);
# 2. bench/bench_core.py on random-weight models of the real Qwen2.5-3B and Qwen3-4B shapes (bf16): greedy
#    identity with generate; tokens/s of the graphs sampler (adapters unmerged, as in a run) against the
#    reference loop and generate at 8 and 64 rows; the same sampler unmerged against merged weights and no
#    adapters; the update's tokens/s and peak memory; one CORE step of the pair with each model's
#    rollout-update mismatch.
# It writes OUT/bench.json and OUT/gpu_checks.log (copy them to bench/results/ to keep them).
# BENCH_EXTRA="--tiny" runs the same on a CPU with tiny shapes (a smoke run).
set -euo pipefail
out=${1:?output folder}
mkdir -p "$out"
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" bench/header.py "the CUDA tests and bench/bench_core.py" "bash bench/gpu_checks.sh $out"
  "$py" -m pytest -q test_core.py -k "cuda or fast or bfloat16 or capture or mismatch" 2>&1 | tail -5
  "$py" bench/bench_core.py --out "$out/bench.json" ${BENCH_EXTRA:-}
} 2>&1 | tee "$out/gpu_checks.log"
