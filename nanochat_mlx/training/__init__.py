"""Fine-tuning core: the reference's loss, gradients, optimizer and checkpoints, on either backend.

Every function takes a model from ``nanochat_mlx.load`` (MLX or torch) and speaks the reference's
canonical tensor names and shapes (``transformer.h.0.attn.c_q.weight``, padded vocab rows
included), whatever layout the backend computes with.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import NanochatError
from .checkpoints import save_checkpoint
from .optim import MuonAdamW, ParamGroup, reference_groups
from .rows import RowGrad, is_embedding

__all__ = [
    "MuonAdamW",
    "ParamGroup",
    "RowGrad",
    "apply_gradients",
    "loss_and_grads",
    "loss_and_row_grads",
    "reference_optimizer",
    "save_checkpoint",
    "state_dict",
    "train_step",
]


def _backend(model: Any) -> ModuleType:
    """The training module of the backend ``model`` belongs to."""
    from ..backends.mlx.model import GPT

    if isinstance(model, GPT):
        backend = "mlx"
    elif type(model).__name__ == "TorchGPT":  # checked by name so that MLX-only installs need no torch
        backend = "torch"
    else:
        raise NanochatError(f"cannot train a {type(model).__name__}: expected a model from nanochat_mlx.load")
    if getattr(model, "quantization", None):
        raise NanochatError("cannot train a quantized model; load it without quantize")
    if backend == "mlx":
        from . import mlx_backend

        return mlx_backend
    from . import torch_backend

    return torch_backend


def _batch(inputs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    if x.ndim != 2 or x.shape != y.shape:
        raise NanochatError(f"inputs and targets must both be B x T lists of ids; got {x.shape} and {y.shape}")
    if not (y != -1).any():
        raise NanochatError("every target is -1 (ignored): the loss is undefined")
    return x, y


def loss_and_grads(model: Any, inputs: Any, targets: Any) -> tuple[float, dict[str, np.ndarray]]:
    """The reference's training loss for one batch and its gradient per canonical tensor.

    ``inputs`` and ``targets`` are B x T ids (targets -1 are ignored); the loss is the mean
    cross-entropy of the softcapped float32 logits over the other targets, as the reference's
    ``GPT.forward(idx, targets)``. Gradients are float32 numpy arrays of the checkpoint's shapes.
    """
    loss, grads = loss_and_row_grads(model, inputs, targets)
    return loss, {name: g.dense() if isinstance(g, RowGrad) else g for name, g in grads.items()}


def loss_and_row_grads(model: Any, inputs: Any, targets: Any) -> tuple[float, dict[str, np.ndarray | RowGrad]]:
    """``loss_and_grads`` with the embedding tables' gradients as ``RowGrad`` (numpy): the rows of
    the batch's ids, the only ones that are not zero (``apply_gradients`` takes them as they are)."""
    backend = _backend(model)
    loss, grads = backend.loss_and_grads(model, *_batch(inputs, targets))
    out: dict[str, np.ndarray | RowGrad] = {}
    # Popped one by one, so each device gradient is freed as its copy is made (holding both sets
    # of a d20 model's gradients at once is gigabytes the machine may not have).
    for name in list(grads):
        g = grads.pop(name)
        if isinstance(g, RowGrad):
            out[name] = RowGrad(g.rows, backend.to_numpy(g.values), g.shape)
        else:
            out[name] = backend.to_numpy(g)
    return float(loss.item()), out


def reference_optimizer(
    model: Any,
    unembedding_lr: float,
    embedding_lr: float,
    matrix_lr: float,
    weight_decay: float,
    scalar_lr: float = 0.5,
    init_lr_frac: float = 1.0,
) -> MuonAdamW:
    """The reference's ``setup_optimizer`` (HEAD) for ``model``, lrs scaled by ``init_lr_frac`` (chat_sft)."""
    backend = _backend(model)
    shapes = {name: tuple(p.shape) for name, p in backend.parameters(model).items()}
    groups = reference_groups(
        shapes, model.config.n_embd, unembedding_lr, embedding_lr, matrix_lr, weight_decay, scalar_lr, init_lr_frac
    )
    return MuonAdamW(groups, backend.KERNELS)


def train_step(
    model: Any,
    optimizer: MuonAdamW,
    inputs: Any,
    targets: Any,
    lr_multiplier: float = 1.0,
    muon_momentum: float | None = None,
) -> float:
    """One step: loss and gradients, each group's lr set to initial_lr x ``lr_multiplier`` (and the
    Muon momentum, if given), the update written into the model. Returns the loss before the step."""
    backend = _backend(model)
    loss, grads = backend.loss_and_grads(model, *_batch(inputs, targets))
    _step(backend, model, optimizer, grads, lr_multiplier, muon_momentum)
    return float(loss.item())


def apply_gradients(
    model: Any,
    optimizer: MuonAdamW,
    grads: Mapping[str, np.ndarray | RowGrad],
    lr_multiplier: float = 1.0,
    muon_momentum: float | None = None,
    *,
    consume: bool = False,
) -> None:
    """``train_step`` with given gradients (canonical names and shapes, e.g. summed over micro-batches;
    an embedding table's may be a ``RowGrad``, as ``loss_and_row_grads`` gives it). ``consume``
    removes each from ``grads`` (a dict) once the optimizer has it, so its memory goes as the step goes."""
    backend = _backend(model)
    params = backend.parameters(model)
    shapes = {n: tuple(g.shape) for n, g in grads.items()}
    wrong = sorted(set(params) ^ set(grads)) or [n for n in params if shapes[n] != tuple(params[n].shape)]
    if wrong:
        raise NanochatError(f"gradients must match the model's canonical tensors; {wrong[0]} does not")
    _step(backend, model, optimizer, _DeviceGrads(backend, grads, params, consume), lr_multiplier, muon_momentum)


class _DeviceGrads(Mapping):
    """numpy gradients as the backend's arrays, each converted when the optimizer reaches it (so
    only one tensor's copy exists at a time); a dense embedding gradient becomes its non-zero rows."""

    def __init__(self, backend: ModuleType, grads: Mapping, params: dict, consume: bool) -> None:
        self.backend, self.grads, self.params, self.consume = backend, grads, params, consume
        self.names = list(grads)

    def __getitem__(self, name: str) -> Any:
        g, like = self.grads.pop(name) if self.consume else self.grads[name], self.params[name]
        if is_embedding(name):
            g = g if isinstance(g, RowGrad) else RowGrad.from_dense(np.asarray(g))
            return RowGrad(g.rows, self.backend.from_numpy(g.values, like), g.shape)
        return self.backend.from_numpy(g, like)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _step(
    backend: ModuleType,
    model: Any,
    optimizer: MuonAdamW,
    grads: Mapping[str, Any],
    lr_multiplier: float,
    muon_momentum: float | None,
) -> None:
    """Set the schedule's lr (and Muon momentum) on every group, update, write the weights back."""
    for group in optimizer.param_groups:
        group.lr = group.initial_lr * lr_multiplier
        if group.kind == "muon" and muon_momentum is not None:
            group.momentum = muon_momentum
    optimizer.update(backend.parameters(model), grads, lambda new: backend.assign(model, new))


def state_dict(model: Any) -> dict[str, np.ndarray]:
    """The model's weights as numpy arrays under the canonical names and shapes (float32)."""
    backend = _backend(model)
    return {name: backend.to_numpy(p) for name, p in backend.parameters(model).items()}
