"""Validation: the mean loss and bits per byte of packed rows, as the reference's ``evaluate_bpb``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from .data import Row, batch_arrays
from .distributed import World


def token_losses(model: Any, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cross-entropy (nats, float32) of every target, 0 where it is -1. Forward only."""
    if type(model).__name__ == "TorchGPT":  # by name, so that MLX-only installs need no torch
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            logits = model.compute(torch.as_tensor(inputs, device=model.device))
            y = torch.as_tensor(targets, device=model.device)
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
            return losses.view(y.shape).float().cpu().numpy()
    import mlx.core as mx
    import mlx.nn as nn

    y = mx.array(targets)
    losses = nn.losses.cross_entropy(model(mx.array(inputs)), mx.maximum(y, 0), reduction="none")
    return np.array(mx.where(y != -1, losses, 0.0).astype(mx.float32))


def evaluate(
    model: Any, rows: Iterable[Row], batch_rows: int, token_bytes: np.ndarray, world: World
) -> tuple[float, float]:
    """(mean loss over the trained targets, bits per byte) of ``rows``; each process takes every
    ``world.size``-th batch. Bytes count as the reference's: special tokens (0 bytes) are left out."""
    sums = np.zeros(4, np.float64)  # nats of all targets, nats of byte-carrying targets, bytes, targets
    batch: list[Row] = []
    index = 0

    def run(batch: list[Row]) -> None:
        x, y = batch_arrays(batch)
        losses = token_losses(model, x, y)
        nbytes = np.where(y >= 0, token_bytes[np.maximum(y, 0)], 0)
        sums[:] += (losses.sum(), (losses * (nbytes > 0)).sum(), nbytes.sum(), (y != -1).sum())

    for row in rows:
        batch.append(row)
        if len(batch) == batch_rows:
            if index % world.size == world.rank:
                run(batch)
            batch, index = [], index + 1
    if batch and index % world.size == world.rank:
        run(batch)
    total = world.all_sum(sums)
    loss = total[0] / total[3] if total[3] else float("nan")
    bpb = total[1] / (math.log(2) * total[2]) if total[2] else float("inf")
    return float(loss), float(bpb)
