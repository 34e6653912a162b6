"""LoRA on the MLX model (QLoRA when its linear layers are quantized): adapters, training, fusing.

Each chosen ``nn.Linear`` (or ``nn.QuantizedLinear``) of a block becomes ``base(x) + scale * x A B``
with A (in x r) drawn uniformly in +-1/sqrt(in) and B (r x out) zero, so training starts from the
base model exactly; ``scale`` is alpha / rank. Only A and B train (plain AdamW); the base stays
frozen. Adapters are saved on their own (``adapters.safetensors`` + ``adapter_config.json``);
fusing adds ``scale * (A B)^T`` to the full-precision base weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import NanochatError
from .mlx_backend import cross_entropy

TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc")
ADAPTERS, CONFIG = "adapters.safetensors", "adapter_config.json"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, key: mx.array) -> None:
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits
        self.base = base
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=key)
        self.lora_b = mx.zeros((rank, out_dims))
        self.scale = alpha / rank

    def __call__(self, x: mx.array) -> mx.array:
        delta = (x @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return self.base(x) + self.scale * delta

    def delta(self) -> mx.array:
        """The weight update ``scale * (A B)^T`` (out x in), float32."""
        return self.scale * (self.lora_a @ self.lora_b).T


def lora_modules(model: nn.Module, layers: int, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """The linear layers (canonical path -> module) to adapt: ``targets`` in the last ``layers`` blocks."""
    blocks = model.transformer.h
    first = 0 if layers < 0 else max(len(blocks) - layers, 0)
    found = {}
    for i in range(first, len(blocks)):
        for path, module in blocks[i].named_modules():
            if path.split(".")[-1] in targets and isinstance(module, (nn.Linear, nn.QuantizedLinear, LoRALinear)):
                found[f"transformer.h.{i}.{path}"] = module
    return found


def apply_lora(model: nn.Module, rank: int, alpha: float, layers: int, targets: tuple[str, ...], seed: int) -> int:
    """Freeze ``model`` and wrap its chosen layers with fresh adapters. Returns the trainable parameter count."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise NanochatError(f"unknown LoRA target {unknown[0]!r} (choose from {', '.join(TARGETS)})")
    if rank < 1:
        raise NanochatError(f"--lora-rank must be >= 1, got {rank}")
    model.freeze()
    chosen = lora_modules(model, layers, targets)
    keys = mx.random.split(mx.random.key(seed), max(len(chosen), 1))
    wrapped = [(path, LoRALinear(module, rank, alpha, keys[i])) for i, (path, module) in enumerate(chosen.items())]
    model.update_modules(tree_unflatten(wrapped))
    mx.eval(model.parameters())
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def adapters(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


class LoRATrainer:
    """Micro-batch gradients of the adapters and AdamW steps on them."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float) -> None:
        self.model, self.base_lr = model, lr
        self.optimizer = optim.AdamW(learning_rate=lr, weight_decay=weight_decay)
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


def save_adapters(directory: Path, model: nn.Module, config: dict[str, Any]) -> None:
    mx.save_safetensors(str(directory / ADAPTERS), adapters(model))
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_adapters(directory: Path, model: nn.Module) -> None:
    path = directory / ADAPTERS
    try:
        weights = mx.load(str(path))
    except (OSError, ValueError) as e:
        raise NanochatError(f"{path}: cannot read the adapters ({e})") from None
    expected = adapters(model)
    if set(weights) != set(expected):
        raise NanochatError(f"{path}: the adapters do not match --lora-layers/--lora-targets of the run")
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())


def fuse(base: nn.Module, adapted: nn.Module) -> None:
    """Add each adapter's update to the matching weight of ``base``, an unquantized copy of the model."""
    deltas = {f"{path}.weight": m.delta() for path, m in adapted.named_modules() if isinstance(m, LoRALinear)}
    params = dict(tree_flatten(base.parameters()))
    fused = [(name, (params[name] + d).astype(params[name].dtype)) for name, d in deltas.items()]
    base.update(tree_unflatten(fused))
    mx.eval(base.parameters())
