"""Matrix products split by output rows across CPU streams, so inference uses every core.

MLX's CPU backend runs each stream on one thread, and one matrix product on one thread (a
single-threaded BLAS on Linux), so a decode step would otherwise keep one core busy whatever the
machine has. Each lane computes a contiguous block of output features: the same dot products as
the unsplit product, element for element. On a GPU there is one lane (the GPU is already parallel).
"""

from __future__ import annotations

import os
import threading

import mlx.core as mx
import mlx.nn as nn

MIN_ROWS = 256  # output features per lane below which a split costs more than it saves
MAX_LANES = 8


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class Lanes:
    """``lanes(layer, x)`` is ``layer(x)``, with a plain Linear's product split over the streams."""

    def __init__(self, n: int) -> None:
        self.streams = [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else []

    def __len__(self) -> int:
        return max(1, len(self.streams))

    def __call__(self, layer: nn.Module, x: mx.array) -> mx.array:
        if type(layer) is not nn.Linear or "bias" in layer:  # quantized, LoRA and biased layers run whole
            return layer(x)
        rows = layer.weight.shape[0]
        n = min(len(self.streams), rows // MIN_ROWS)
        if n < 2:
            return layer(x)
        bounds = [rows * i // n // 16 * 16 for i in range(n)] + [rows]  # blocks of 16: the bf16 kernel's tile
        w = layer.weight
        parts = [mx.matmul(x, w[a:b].T, stream=s) for a, b, s in zip(bounds, bounds[1:], self.streams, strict=False)]
        return mx.concatenate(parts, axis=-1)


SERIAL = Lanes(1)


_per_thread = threading.local()


def device_lanes() -> Lanes:
    """The default device's lanes: one per core on the CPU, one on the GPU.

    MLX streams belong to the thread that made them, and the TUI and the server run the model on
    worker threads (a new one per generation in the TUI), so each thread makes its own streams.
    """
    if mx.default_device() == mx.gpu:
        return SERIAL
    lanes = getattr(_per_thread, "lanes", None)
    if lanes is None:
        lanes = _per_thread.lanes = Lanes(min(cpu_cores(), MAX_LANES))
    return lanes
