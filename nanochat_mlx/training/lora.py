"""LoRA on the MLX model (QLoRA when its linear layers are quantized): adapters and their training.

Each chosen ``nn.Linear`` (or ``nn.QuantizedLinear``) of a block becomes ``base(x) + scale * x A B``
(``lora_spec``: the layers, init, file and fusing both backends share). Only A and B train
(plain AdamW); the base stays frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .lora_spec import ADAMW_BETAS, ADAMW_EPS, chosen_layers, initial_a, read_adapters
from .mlx_backend import cross_entropy


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, a: np.ndarray, alpha: float) -> None:
        super().__init__()
        out_dims = base.weight.shape[0]
        rank = a.shape[1]
        self.base = base
        self.lora_a = mx.array(a)
        self.lora_b = mx.zeros((rank, out_dims))
        self.scale = alpha / rank

    def __call__(self, x: mx.array) -> mx.array:
        delta = (x @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return self.base(x) + self.scale * delta


def _in_dims(module: nn.Module) -> int:
    in_dims = module.weight.shape[1]
    return in_dims * 32 // module.bits if isinstance(module, nn.QuantizedLinear) else in_dims


def apply_lora(model: nn.Module, rank: int, alpha: float, layers: int, targets: tuple[str, ...], seed: int) -> int:
    """Freeze ``model`` and wrap its chosen layers with fresh adapters. Returns the trainable parameter count."""
    paths = chosen_layers(len(model.transformer.h), rank, layers, targets)
    model.freeze()
    modules = dict(model.named_modules())
    wrapped = [(p, LoRALinear(modules[p], initial_a(seed, p, _in_dims(modules[p]), rank), alpha)) for p in paths]
    model.update_modules(tree_unflatten(wrapped))
    mx.eval(model.parameters())
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def adapters(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The adapters as float32 numpy arrays under their canonical names (what the file holds)."""
    return {name: np.array(a.astype(mx.float32)) for name, a in adapters(model).items()}


class LoRATrainer:
    """Micro-batch gradients of the adapters and AdamW steps on them."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float) -> None:
        self.model, self.base_lr = model, lr
        self.optimizer = optim.AdamW(
            learning_rate=lr, betas=list(ADAMW_BETAS), eps=ADAMW_EPS, weight_decay=weight_decay
        )
        self._grad = nn.value_and_grad(model, lambda x, y: cross_entropy(model(x), y))

    def loss_and_grads(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        loss, grads = self._grad(mx.array(inputs), mx.array(targets))
        grads = dict(tree_flatten(grads))
        mx.eval(loss, grads)
        return loss.item(), {name: np.array(g.astype(mx.float32)) for name, g in grads.items()}

    def apply(self, grads: dict[str, np.ndarray], lr_multiplier: float) -> None:
        self.optimizer.learning_rate = self.base_lr * lr_multiplier
        params = adapters(self.model)
        tree = tree_unflatten([(n, mx.array(g).astype(params[n].dtype)) for n, g in grads.items()])
        self.optimizer.update(self.model, tree)
        mx.eval(self.model.parameters(), self.optimizer.state)

    def save_state(self, path: Path) -> None:
        np.savez(path, **{name: np.array(v) for name, v in tree_flatten(self.optimizer.state)})

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        self.optimizer.init(self.model.trainable_parameters())
        self.optimizer.state = tree_unflatten([(n, mx.array(v)) for n, v in state.items()])


def load_adapters(directory: Path, model: nn.Module) -> None:
    expected = {name: tuple(a.shape) for name, a in adapters(model).items()}
    weights = read_adapters(directory, expected)
    model.update(tree_unflatten([(name, mx.array(a)) for name, a in weights.items()]))
    mx.eval(model.parameters())
