"""One-row kernels streaming a whole model's matrices from memory, as a decode step reads them.

    python benchmarks/stream_kernels.py --geometry d20 --threads 1

All of a g1 geometry's matrices in model order (every layer's four shapes, then a 32768-row head),
one pass per kernel, interleaved rounds (the first warms up): weight bytes / median pass time. The
candidates: ``F.linear`` (the reference's), ``torch.mv``, oneDNN's and MKL's packed weights, and
OpenBLAS through numpy limited to the same thread count (threadpoolctl, when installed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from decode_kernels import read_bandwidth

from nanochat_mlx.synthetic import geometry_config


def onednn(w: torch.Tensor):
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def mkl(w: torch.Tensor):
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 1)
    return lambda x: torch.ops.mkl._mkl_linear(x.view(1, -1), packed, w, None, 1)


def numpy_blas(w: torch.Tensor):
    array = w.numpy()
    return lambda x: torch.from_numpy(array @ x.view(-1).numpy())


def kernels(ws: list[torch.Tensor]) -> dict:
    """Kernel name -> one function per matrix (packed copies made here, outside the timing)."""
    out = {
        "linear": [lambda x, w=w: F.linear(x, w) for w in ws],
        "mv": [lambda x, w=w: torch.mv(w, x.view(-1)) for w in ws],
        "onednn": [onednn(w) for w in ws],
    }
    if ws[0].dtype == torch.float32:
        out["mkl"] = [mkl(w) for w in ws]
        out["numpy"] = [numpy_blas(w) for w in ws]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="d20")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy's BLAS then uses its own default thread count
        threadpool_limits = None
    c = geometry_config(args.geometry, "g1")
    e = c.n_embd
    shapes = [(3 * e, e), (e, e), (4 * e, e), (e, 4 * e)]
    print(f"{args.geometry}, {args.threads} threads, read bandwidth {read_bandwidth() / 1e9:.1f} GB/s")
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        ws = [(torch.randn(n, k) / k**0.5).to(dtype) for _ in range(c.n_layer) for n, k in shapes]
        ws.append((torch.randn(32768, e) * 0.01).to(dtype))
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        xs = {k: torch.randn(1, 1, k).to(dtype) for k in (e, 4 * e)}
        cands = kernels(ws)
        times: dict[str, list[float]] = {name: [] for name in cands}
        limit = threadpool_limits(args.threads) if threadpool_limits else None
        with torch.inference_mode():
            for r in range(args.rounds + 1):
                for name, fns in cands.items():
                    t = time.perf_counter()
                    for w, f in zip(ws, fns, strict=True):
                        f(xs[w.shape[1]])
                    if r:
                        times[name].append(time.perf_counter() - t)
        if limit is not None:
            limit.restore_original_limits()
        row = ", ".join(f"{name} {nbytes / statistics.median(v) / 1e9:.1f}" for name, v in times.items())
        print(f"{dt}: {nbytes / 1e9:.2f} GB per pass; GB/s {row}")


if __name__ == "__main__":
    main()
