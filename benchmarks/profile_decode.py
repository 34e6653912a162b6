"""Where one decode step's time goes: ours (torch backend, our Engine) vs the reference's own code.

    python benchmarks/profile_decode.py --geometry d20 --arch g9 --dtype float32 --threads 1 --context 1000

Both run ``--steps`` greedy decode steps after a ``--context``-token prompt under ``torch.profiler``
(started once the first token is out, so prefill is not counted). Per step: the wall time, the
self time of the matrix products, of attention, of everything else in aten, and what is left
(Python, dispatch, the profiler's own cost), plus the matrix products' weight bandwidth.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from vs_reference import bytes_per_token, reference_engine

MATMUL = ("addmv", "aten::mv", "aten::mm", "addmm", "bmm", "_weight_int", "aten::dot")
ATTENTION = ("scaled_dot_product", "softmax")


def category(op: str) -> str:
    if any(m in op for m in MATMUL):
        return "matmul"
    if any(a in op for a in ATTENTION):
        return "attention"
    return "other aten"


def profiled(items, steps: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """Seconds per step of the ``steps`` items after the first, and self seconds per step by category."""
    items = iter(items)
    next(items)
    prof = profile(activities=[ProfilerActivity.CPU])
    prof.start()
    t = time.perf_counter()
    for _ in range(steps):
        next(items)
    wall = (time.perf_counter() - t) / steps
    prof.stop()
    by_cat: dict[str, float] = defaultdict(float)
    ops = []
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        seconds = e.self_cpu_time_total / 1e6 / steps
        by_cat[category(e.key)] += seconds
        ops.append((e.key, seconds))
    by_cat["python + dispatch"] = wall - sum(by_cat.values())
    return wall, dict(by_cat), sorted(ops, key=lambda o: -o[1])[:8]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="d12")
    p.add_argument("--arch", default="g9")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from nanochat_mlx.backends.torch.model import build_torch_model
    from nanochat_mlx.engine import Engine
    from nanochat_mlx.sampling import SamplingParams
    from nanochat_mlx.synthetic import random_checkpoint

    ckpt = random_checkpoint(args.geometry, arch=args.arch, seed=0)
    ref_engine = reference_engine(ckpt, args.arch, args.dtype)
    model = build_torch_model(ckpt, dtype=args.dtype)
    engine = Engine(model, ckpt.tokenizer)
    prompt = [ckpt.tokenizer.get_bos_token_id(), *range(300, 300 + args.context - 1)]
    n = args.steps + 2
    weights = bytes_per_token(model, 0)
    print(f"{args.geometry} {args.arch} {args.dtype}, {args.threads} threads, context {args.context}")
    greedy = SamplingParams(temperature=0.0, max_tokens=n)
    with torch.inference_mode():
        for name, items in (
            ("ours", (e for e in engine.generate(prompt, greedy, stop_tokens=()) if e.tokens)),
            ("reference", ref_engine.generate(prompt, num_samples=1, max_tokens=n, temperature=0.0)),
        ):
            wall, cats, ops = profiled(items, args.steps)
            parts = ", ".join(f"{c} {1e3 * s:.2f}" for c, s in cats.items())
            print(f"{name:9s} step {1e3 * wall:.2f} ms: {parts}; matmuls {weights / cats['matmul'] / 1e9:.1f} GB/s")
            print("          top: " + ", ".join(f"{k} {1e3 * s:.2f}" for k, s in ops))


if __name__ == "__main__":
    main()
