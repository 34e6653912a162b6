"""Training on the MLX model: its parameters already carry the canonical names and shapes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .optim import POLAR_EXPRESS
from .rows import RowGrad, is_embedding


def parameters(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def assign(model: nn.Module, params: dict[str, mx.array]) -> None:
    model.update(tree_unflatten(list(params.items())))
    mx.eval(model.parameters())


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy over the targets that are not -1 (the reference's ignore_index)."""
    keep = targets != -1
    losses = nn.losses.cross_entropy(logits, mx.where(keep, targets, 0), reduction="none")
    return mx.where(keep, losses, 0.0).sum() / keep.sum()


def loss_and_grads(model: nn.Module, inputs: np.ndarray, targets: np.ndarray) -> tuple[mx.array, dict]:
    """The loss and every gradient; the embedding tables' as ``RowGrad`` (the batch's rows only)."""
    rows, inverse = np.unique(inputs, return_inverse=True)
    index = mx.array(rows)
    full = {name: p for name, p in parameters(model).items() if is_embedding(name)}
    x, y = mx.array(inverse.reshape(inputs.shape)), mx.array(targets)
    # Each table swapped for its batch's rows, looked up by position among them: the gradient of
    # those rows is the table's whole gradient, and the table's own is never materialized.
    model.update(tree_unflatten([(name, table[index]) for name, table in full.items()]))
    try:
        loss, grads = nn.value_and_grad(model, lambda: cross_entropy(model(x), y))()
        grads = dict(tree_flatten(grads))
        mx.eval(loss, grads)
    finally:
        model.update(tree_unflatten(list(full.items())))
    for name, table in full.items():
        grads[name] = RowGrad(rows, grads[name], tuple(table.shape))
    return loss, grads


def from_numpy(array: np.ndarray, like: mx.array) -> mx.array:
    return mx.array(np.asarray(array, dtype=np.float32)).astype(like.dtype)


def to_numpy(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32))


def _norm(x: mx.array, axes: tuple[int, ...]) -> mx.array:
    return mx.sqrt(mx.sum(mx.square(x), axis=axes, keepdims=True))


def _lerp(start: mx.array, end: mx.array, weight: float) -> mx.array:
    return start + weight * (end - start)


class MLXKernels:
    """The AdamW and Muon updates in float32 MLX ops."""

    def zeros(self, shape: tuple[int, ...], like: mx.array) -> mx.array:
        return mx.zeros(shape, dtype=like.dtype)

    def stack(self, arrays: list[mx.array]) -> mx.array:
        return mx.stack(arrays)

    def unstack(self, array: mx.array) -> list[mx.array]:
        return [array[i] for i in range(array.shape[0])]

    def take(self, array: mx.array, rows: np.ndarray) -> mx.array:
        return array[mx.array(rows)]

    def put(self, array: mx.array, rows: np.ndarray, values: mx.array) -> mx.array:
        array[mx.array(rows)] = values.astype(array.dtype)
        mx.eval(array)
        return array

    def scale(self, array: mx.array, factor: float) -> mx.array:
        out = (array.astype(mx.float32) * factor).astype(array.dtype)
        mx.eval(out)
        return out

    def adamw(self, p, g, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay):
        dtype = p.dtype
        p, g = p.astype(mx.float32), g.astype(mx.float32)
        p = p * (1 - lr * weight_decay)  # decoupled weight decay, before the update
        exp_avg = _lerp(exp_avg, g, 1 - beta1)  # the moments are kept in float32
        exp_avg_sq = _lerp(exp_avg_sq, mx.square(g), 1 - beta2)
        denom = mx.sqrt(exp_avg_sq / (1 - beta2**step)) + eps
        p = p - (lr / (1 - beta1**step)) * (exp_avg / denom)
        out = p.astype(dtype), exp_avg, exp_avg_sq
        mx.eval(out)
        return out

    def muon(self, p, g, momentum_buffer, second_buffer, *, momentum, lr, weight_decay, beta2, ns_steps, red_dim):
        dtype = p.dtype
        momentum_buffer = _lerp(momentum_buffer, g, 1 - momentum)
        g = _lerp(g, momentum_buffer, momentum)  # Nesterov
        x = g.astype(mx.float32)
        # MuonEq: every row rescaled to the mean row norm before orthogonalizing.
        target = _norm(x, (-2, -1)) / (x.shape[-2] ** 0.5)
        x = x * (target / mx.maximum(_norm(x, (-1,)), 1e-6))
        x = x / (_norm(x, (-2, -1)) * 1.01 + 1e-6)
        tall = x.shape[-2] > x.shape[-1]
        for a, b, c in POLAR_EXPRESS[:ns_steps]:
            if tall:
                A = x.swapaxes(-1, -2) @ x
                x = a * x + x @ (b * A + c * (A @ A))
            else:
                A = x @ x.swapaxes(-1, -2)
                x = a * x + (b * A + c * (A @ A)) @ x
        # Muon+: snap the Frobenius norm to that of a semi-orthogonal matrix.
        x = x * (min(x.shape[-2], x.shape[-1]) ** 0.5 / mx.maximum(_norm(x, (-2, -1)), 1e-6))
        # NorMuon: per-row (or per-column) step sizes from a second-moment EMA, total norm kept.
        v_mean = mx.mean(mx.square(x), axis=red_dim, keepdims=True)
        size = x.shape[red_dim]
        v_norm = mx.sqrt(mx.sum(v_mean, axis=(-2, -1), keepdims=True) * size)
        second_buffer = _lerp(second_buffer, v_mean, 1 - beta2)
        step_size = mx.rsqrt(mx.maximum(second_buffer, 1e-10))
        v_norm_new = mx.sqrt(mx.sum(v_mean * size * mx.square(step_size), axis=(-2, -1), keepdims=True))
        x = x * (step_size * (v_norm / mx.maximum(v_norm_new, 1e-10)))
        # Cautious weight decay: only where the update and the weight agree in sign.
        mask = (x * p) >= 0
        p = p - (lr * x + lr * weight_decay * p * mask)
        out = p.astype(dtype), momentum_buffer, second_buffer
        mx.eval(out)
        return out


KERNELS = MLXKernels()
