"""Check that the Engine's reported decode tok/s equals an outside wall clock over its events.

    python benchmarks/engine_clock.py --geometry d12 --dtype float32 --tokens 64 --rounds 5

The torch runner on the CPU does not pipeline, and the Engine yields token k's event once it has
run the step for token k+1 (the last event needs no further step). So between the first token's
event and the final event the consumer sees exactly n-2 decode steps: outside rate =
(n - 2) / (t_final - t_first_event), against the engine's (n - 1) steps over its own interval.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nanochat_mlx.backends.torch.model import build_torch_model
from nanochat_mlx.engine import Engine
from nanochat_mlx.sampling import SamplingParams
from nanochat_mlx.synthetic import random_checkpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="d12")
    p.add_argument("--arch", default="g9")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = random_checkpoint(args.geometry, arch=args.arch)
    engine = Engine(build_torch_model(ckpt, dtype=args.dtype), ckpt.tokenizer)
    assert not engine.runner.pipelined
    prompt = [ckpt.tokenizer.get_bos_token_id(), *range(300, 363)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    ratios, rates = [], []
    for _ in range(args.rounds):
        first = None
        for event in engine.generate(prompt, params, stop_tokens=()):
            if event.tokens and first is None:
                first = time.perf_counter()
        final = time.perf_counter()
        n = engine.last_stats.generated_tokens
        outside = (n - 2) / (final - first)
        rates.append(outside)
        ratios.append(engine.last_stats.decode_tps / outside)
    print(
        json.dumps(
            {
                **vars(args),
                "outside_tps": rates,
                "engine_over_outside": ratios,
                "median_engine_over_outside": statistics.median(ratios),
            }
        )
    )


if __name__ == "__main__":
    main()
