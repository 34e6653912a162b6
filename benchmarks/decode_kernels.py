"""The one-row (decode) matrix-vector kernels on a geometry's real shapes, and the machine's roofline.

    python benchmarks/decode_kernels.py --geometry d20 --threads 2

Prints GB/s per kernel and shape (weight bytes read / median time of interleaved rounds) and the
read bandwidth (the best of a torch sum and a matrix-vector product over 1 GiB, at the same
thread count) that bounds them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from nanochat_mlx.backends.torch.model import GEMV_KERNELS, Int4Linear, Int8Linear, gemv_candidates
from nanochat_mlx.synthetic import geometry_config


def shapes(geometry: str) -> dict[str, tuple[int, int]]:
    """The decode matmuls of a g9 model of ``geometry`` (fused q/k/v/gate rows, as the torch backend runs them)."""
    c = geometry_config(geometry, "g9")
    e = c.n_embd
    return {
        "c_qkv": (3 * e + c.n_kv_head, e),
        "attn.c_proj": (e, e),
        "c_fc": (4 * e, e),
        "mlp.c_proj": (e, 4 * e),
        "lm_head": (c.vocab_size, e),
    }


def read_bandwidth(nbytes: int = 1 << 30, rounds: int = 7) -> float:
    """Bytes per second read from a float32 buffer far larger than the caches, at torch's thread
    count: the best round of a reduction and of a matrix-vector product over it (the kernels
    stream memory differently; the roofline is the faster)."""
    buf = torch.ones(nbytes // 4)
    matrix, x = buf.view(-1, 4096), torch.ones(4096)
    times = []
    for _ in range(rounds):
        for read in (buf.sum, lambda: torch.mv(matrix, x)):
            t = time.perf_counter()
            read()
            times.append(time.perf_counter() - t)
    return nbytes / min(times)


def candidates(w: torch.Tensor) -> dict[str, tuple[Callable, int]]:
    """Kernel name -> (fn(x), bytes of weights it reads)."""
    names = [*gemv_candidates(w), *(["numpy"] if w.dtype == torch.float32 else [])]
    out = {name: (lambda x, f=GEMV_KERNELS[name]: f(w, x), w.numel() * w.element_size()) for name in names}
    if w.dtype == torch.bfloat16:
        out["int8"] = (Int8Linear(w), w.numel() + 2 * w.shape[0])
        q4 = Int4Linear(w)
        out["int4"] = (q4, q4.qweight.numel() + q4.scales_zeros.numel() * 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="d20")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, read bandwidth {read_bandwidth() / 1e9:.1f} GB/s")
    for dtype in args.dtypes.split(","):
        for name, (n, k) in shapes(args.geometry).items():
            w = (torch.randn(n, k) / k**0.5).to(getattr(torch, dtype))
            x = torch.randn(1, 1, k).to(w.dtype)
            cands = candidates(w)
            times: dict[str, list[float]] = {c: [] for c in cands}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for c, (fn, _) in cands.items():
                        t = time.perf_counter()
                        for _ in range(3):
                            fn(x)
                        times[c].append((time.perf_counter() - t) / 3)
            row = ", ".join(f"{c} {cands[c][1] / statistics.median(v) / 1e9:5.1f}" for c, v in times.items())
            print(f"{dtype:8s} {name:12s} {n}x{k}: GB/s {row}")


if __name__ == "__main__":
    main()
