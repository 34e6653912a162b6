#!/usr/bin/env bash
# Reproduces benchmarks/RESULTS.md on a CPU-only machine (runs one configuration at a time).
# --torch-threads 1: on a 2-core box torch's 2 OpenMP threads contend with MLX's worker threads
# when trials are interleaved in one process (reference decode swung between 1.3 and 43 tok/s).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
{ time python -m nanochat_mlx.bench --quick --json "$OUT/quick.json"; } 2>&1 | tail -4
# 1. g1 math (the only one mlx-lm implements): ours vs mlx-lm vs the reference, float32 and bfloat16.
python -m nanochat_mlx.bench --geometry d12 --arch g1 --dtype float32,bfloat16 --compare all --torch-threads 1 \
  --prompt-tokens 128,512 --decode-tokens 16 --trials 2 \
  --json "$OUT/d12-g1.json" --markdown "$OUT/d12-g1.md" --plot "$OUT/d12-g1.png"
