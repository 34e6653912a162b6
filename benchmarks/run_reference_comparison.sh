#!/usr/bin/env bash
# Reproduces the "vs the reference's own code" tables of benchmarks/RESULTS.md (CPU, torch backend).
# Usage: benchmarks/run_reference_comparison.sh G1_CHECKOUT G9_CHECKOUT [TRIALS]
#   G1_CHECKOUT: karpathy/nanochat at d5759400f96789d7649e040e5f444790101baa21 (last g1 commit)
#   G9_CHECKOUT: karpathy/nanochat at 92d63d4e8bb4df75c3b71618f31ddde2378b2bcd (g9)
# e.g. git clone https://github.com/karpathy/nanochat ref && git -C ref worktree add ../ref-g1 d5759400 \
#      && git -C ref checkout 92d63d4e   (and pip install -e '.[reference]' for what its modules import)
# One run per generation and thread count (float32 and bfloat16 in the same run, interleaved);
# prompts of 128 and 1024 tokens, 48 decoded tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
G1=$1 G9=$2 TRIALS=${3:-4}
OUT=benchmarks/results
mkdir -p "$OUT"
for threads in 1 2; do
  for gen in g1 g9; do
    repo=$G1; [ "$gen" = g9 ] && repo=$G9
    name="d12-$gen-vs-reference-t$threads"
    { time python -m nanochat_mlx.bench --geometry d12 --arch "$gen" --backend torch --dtype float32,bfloat16 \
        --compare reference --reference-repo "$repo" --torch-threads "$threads" --prompt-tokens 128,1024 \
        --decode-tokens 48 --trials "$TRIALS" --chat-turns 0 --json "$OUT/$name.json" --markdown "$OUT/$name.md" \
        > "$OUT/$name.log" 2>&1; } 2>> "$OUT/$name.log"
    tail -3 "$OUT/$name.log"
  done
done
