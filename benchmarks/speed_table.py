"""Render benchmarks/results/*.jsonl (from vs_reference.py) as the markdown tables of SPEED_RESULTS.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/speed.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(
        "| geometry | gen | dtype | threads | contender | decode ours / reference | prefill ours / reference "
        "| decode tok/s (rounds) | reference tok/s | % of roofline | engine / outside clock | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, ratio in r["ratio_vs_reference"].items():
            rounds = ", ".join(f"{v:.1f}" for v in r["all"][name])
            pre = r.get("prefill_ratio_vs_reference", {}).get(name)
            load = "-".join(f"{x:.1f}" for x in r["load_average"]) if "load_average" in r else "?"
            print(
                f"| {r['geometry']} | {r['arch']} | {r['dtype']} | {r['threads']} | {name} | **{ratio:.2f}x** "
                f"| {f'{pre:.2f}x' if pre else '-'} "
                f"| {r['decode_tps'][name]:.2f} ({rounds}) | {r['decode_tps']['reference']:.2f} "
                f"| {100 * r['fraction_of_roofline'][name]:.0f}% of {r['roofline_tps'][name]:.1f} "
                f"| {r['engine_reported_over_outside_clock'][name]:.3f} | {load} |"
            )
    bandwidths = ", ".join(f"{r['read_bandwidth_gbs']:.1f} (t{r['threads']})" for r in rows)
    print(f"\nRead bandwidth measured at the start of each process (GB/s, threads): {bandwidths}")


if __name__ == "__main__":
    main()
