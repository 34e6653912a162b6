#!/usr/bin/env bash
# The decode-speed matrix of benchmarks/SPEED_RESULTS.md: torch backend vs the reference's own code,
# one process per (geometry, generation, dtype), rounds interleaved inside it. Appends JSON lines;
# render them with benchmarks/speed_table.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/speed.jsonl}
run() {
  python benchmarks/vs_reference.py --threads "${THREADS:-1}" --prompt-tokens "${PROMPT:-128}" \
    --decode-tokens "${DECODE:-24}" --rounds "${ROUNDS:-3}" --json "$out" "$@"
}
for geometry in d20 d12; do
  for arch in g9 g1; do
    run --geometry "$geometry" --arch "$arch" --dtype float32
    if [ "$arch" = g9 ]; then
      run --geometry "$geometry" --arch "$arch" --dtype bfloat16 --quantize none,8,4
    else
      run --geometry "$geometry" --arch "$arch" --dtype bfloat16
    fi
  done
done
