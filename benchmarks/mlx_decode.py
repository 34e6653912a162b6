"""Steady-state MLX decode: our Engine vs mlx-lm's ``generate_step`` on identical g1 weights.

Both generate greedily from the same 16-token prompt in one process, rounds interleaved; each
token's arrival is stamped by the caller, and decode speed is counted from the ``--skip``-th token
to the last, so neither prefill nor start-up noise enters. ``nanochat-mlx bench --compare mlx-lm``
measures the same pair through T1/Tn runs (prefill included in its noise); this is the quieter
figure. Usage: ``python benchmarks/mlx_decode.py --geometry d12 --dtype float32,bfloat16``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import time

import mlx.core as mx

from nanochat_mlx.backends.mlx.lanes import device_lanes
from nanochat_mlx.bench.contenders import mlx_lm_model
from nanochat_mlx.loading import from_checkpoint
from nanochat_mlx.options import LoadOptions
from nanochat_mlx.sampling import SamplingParams
from nanochat_mlx.synthetic import random_checkpoint


def ours(ckpt, dtype: str, prompt: list[int], n: int):
    engine = from_checkpoint(ckpt, LoadOptions(ckpt.name, arch="g1", dtype=dtype, backend="mlx")).engine
    params = SamplingParams(temperature=0.0, max_tokens=n, seed=0)

    def run() -> list[float]:
        return [time.perf_counter() for ev in engine.generate(prompt, params, stop_tokens=()) for _ in ev.tokens]

    return run


def mlx_lm(ckpt, dtype: str, prompt: list[int], n: int):
    generate_step = importlib.import_module("mlx_lm.generate").generate_step
    model = mlx_lm_model(ckpt, dtype)
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731

    def run() -> list[float]:
        return [time.perf_counter() for _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=greedy)]

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", default="d12")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (the decode context)")
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--skip", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="append one JSON line per dtype")
    a = p.parse_args()
    ckpt = random_checkpoint(a.geometry, arch="g1")
    prompt = [ckpt.tokenizer.get_bos_token_id(), *range(100, 99 + a.prompt_tokens)]
    runs = {}
    for dtype in a.dtype.split(","):
        runs[("ours", dtype)] = ours(ckpt, dtype, prompt, a.tokens)
        runs[("mlx-lm", dtype)] = mlx_lm(ckpt, dtype, prompt, a.tokens)
    for run in runs.values():  # warm-up: kernels compiled, weights touched
        run()
    rates: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for r in range(a.rounds):
        for key, run in runs.items():
            stamps = run()
            rates[key].append((len(stamps) - 1 - a.skip) / (stamps[-1] - stamps[a.skip]))
            gap = max(t1 - t0 for t0, t1 in zip(stamps[a.skip :], stamps[a.skip + 1 :], strict=False))
            rate = f"{rates[key][-1]:6.2f} tok/s, longest gap {gap * 1e3:.0f} ms"
            print(f"round {r + 1} {key[0]:6s} {key[1]:8s} {rate}", flush=True)
    for dtype in a.dtype.split(","):
        o, m = rates[("ours", dtype)], rates[("mlx-lm", dtype)]
        ratios = [x / y for x, y in zip(o, m, strict=True)]
        row = {
            "geometry": a.geometry, "arch": "g1", "dtype": dtype, "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "ours_tps": statistics.median(o),
            "mlx_lm_tps": statistics.median(m), "rounds": a.rounds, "tokens": a.tokens, "skip": a.skip,
            "lanes": len(device_lanes()), "device": str(mx.default_device()), "mlx": mx.__version__,
            "mlx_lm": importlib.metadata.version("mlx-lm"), "cpu": platform.processor() or platform.machine(),
            "prompt_tokens": a.prompt_tokens,
        }  # fmt: skip
        print(
            f"{a.geometry} g1 {dtype}: ours {row['ours_tps']:.2f} tok/s, mlx-lm {row['mlx_lm_tps']:.2f} tok/s, "
            f"ours/mlx-lm {row['ratio']:.3f}x ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})"
        )
        if a.json:
            with open(a.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
