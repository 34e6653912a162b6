"""LoRA on the torch model: the MLX LoRA's adapters (``lora_spec``) on the torch model's layout.

The torch model computes q, k and v (and the value-embedding gate) in one fused ``attn.c_qkv``;
an adapter of ``c_q``, ``c_k`` or ``c_v`` adds its ``scale * (x @ A) @ B`` to that layer's rows of
the fused output, which is what the reference's separate c_q, c_k, c_v would compute. The other
targets wrap their layer whole. Only A and B train, with the AdamW arithmetic of
``mlx.optimizers.AdamW``, so both backends take the same steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backends.torch.model import TorchGPT
from ..errors import NanochatError
from .lora_spec import ADAMW_BETAS, ADAMW_EPS, chosen_layers, initial_a, read_adapters

WHOLE = "whole"  # the one part of an unfused layer


class LoRALinear(nn.Module):
    """``base`` plus adapters on row ranges of its output (``WHOLE``, all of it, for an unfused layer).

    ``parts`` is every output range in order (name -> (start, stop)); ``adapters`` those adapted,
    name -> initial A (in x r).
    """

    def __init__(
        self, base: nn.Module, parts: dict[str, tuple[int, int]], adapters: dict[str, np.ndarray], alpha: float
    ) -> None:
        super().__init__()
        self.base, self.parts = base, parts
        self.lora_a = nn.ParameterDict({n: nn.Parameter(torch.from_numpy(a)) for n, a in adapters.items()})
        self.lora_b = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(a.shape[1], parts[n][1] - parts[n][0])) for n, a in adapters.items()}
        )
        self.scale = alpha / next(iter(adapters.values())).shape[1]
        device = next(base.parameters()).device
        self.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        pieces = []
        for name, (start, stop) in self.parts.items():
            piece = out[..., start:stop]
            if name in self.lora_a:
                a, b = self.lora_a[name].to(x.dtype), self.lora_b[name].to(x.dtype)
                piece = piece + self.scale * ((x @ a) @ b)
            pieces.append(piece)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)


def _fused_parts(attention: nn.Module, rows: int) -> dict[str, tuple[int, int]]:
    """The output row range of each canonical part of an attention layer's ``c_qkv``."""
    index = attention.split(torch.arange(rows)[:, None].expand(rows, attention.ve_channels or 1))
    return {name: (int(view[0, 0]), int(view[-1, 0]) + 1) for name, view in index.items()}


def apply_lora(model: TorchGPT, rank: int, alpha: float, layers: int, targets: tuple[str, ...], seed: int) -> int:
    """Freeze ``model`` and wrap its chosen layers with fresh adapters. Returns the trainable parameter count."""
    if model.quantization:
        raise NanochatError("torch LoRA needs unquantized weights: drop --quantize (QLoRA runs on --backend mlx)")
    paths = chosen_layers(model.config.n_layer, rank, layers, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, block in enumerate(model.transformer.h):
        prefix = f"transformer.h.{i}."
        chosen = {p.removeprefix(prefix): p for p in paths if p.startswith(prefix)}
        qkv = {n.removeprefix("attn."): p for n, p in chosen.items() if n in ("attn.c_q", "attn.c_k", "attn.c_v")}
        if qkv:
            fused = block.attn.c_qkv
            rows, in_dims = fused.weight.shape
            adapters = {n: initial_a(seed, p, in_dims, rank) for n, p in qkv.items()}
            block.attn.c_qkv = LoRALinear(fused, _fused_parts(block.attn, rows), adapters, alpha)
        for name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            if name in chosen:
                parent, attr = getattr(block, name.split(".")[0]), name.split(".")[1]
                base = getattr(parent, attr)
                rows, in_dims = base.weight.shape
                a = initial_a(seed, chosen[name], in_dims, rank)
                setattr(parent, attr, LoRALinear(base, {WHOLE: (0, rows)}, {WHOLE: a}, alpha))
    return sum(p.numel() for p in adapters_of(model).values())


def adapters_of(model: TorchGPT) -> dict[str, nn.Parameter]:
    """The adapters under their canonical names (``transformer.h.3.attn.c_q.lora_a``)."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            layer = path.removesuffix(".c_qkv")  # a fused layer's parts are named after their own layer
            for part in module.lora_a:
                name = path if part == WHOLE else f"{layer}.{part}"
                out[f"{name}.lora_a"], out[f"{name}.lora_b"] = module.lora_a[part], module.lora_b[part]
    return out


def adapter_arrays(model: TorchGPT) -> dict[str, np.ndarray]:
    """The adapters as float32 numpy arrays under their canonical names (what the file holds)."""
    return {name: p.detach().float().cpu().numpy().copy() for name, p in adapters_of(model).items()}


def load_adapters(directory: Path, model: TorchGPT) -> None:
    params = adapters_of(model)
    weights = read_adapters(directory, {name: tuple(p.shape) for name, p in params.items()})
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(weights[name]))


class LoRATrainer:
    """Micro-batch gradients of the adapters and AdamW steps on them (``mlx.optimizers.AdamW``'s math)."""

    def __init__(self, model: TorchGPT, lr: float, weight_decay: float) -> None:
        self.model, self.base_lr, self.weight_decay = model, lr, weight_decay
        self.params = adapters_of(model)
        self.state: dict[str, torch.Tensor] = {}

    def loss_and_grads(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        x = torch.as_tensor(inputs, dtype=torch.long, device=self.model.device)
        y = torch.as_tensor(targets, dtype=torch.long, device=self.model.device)
        for p in self.params.values():
            p.grad = None
        logits = self.model.compute(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1)
        loss.backward()
        grads = {name: p.grad.float().cpu().numpy().copy() for name, p in self.params.items()}
        for p in self.params.values():
            p.grad = None
        return float(loss.item()), grads

    @torch.no_grad()
    def apply(self, grads: dict[str, np.ndarray], lr_multiplier: float) -> None:
        # float32 scalars, as MLX holds its learning rate (an array) and casts python floats
        lr = torch.tensor(self.base_lr * lr_multiplier, dtype=torch.float32)
        b1, b2 = ADAMW_BETAS
        for name, p in self.params.items():
            g = torch.from_numpy(grads[name]).to(p.device)
            if f"{name}.m" not in self.state:
                self.state[f"{name}.m"], self.state[f"{name}.v"] = torch.zeros_like(p), torch.zeros_like(p)
            m = b1 * self.state[f"{name}.m"] + (1 - b1) * g
            v = b2 * self.state[f"{name}.v"] + (1 - b2) * g.square()
            self.state[f"{name}.m"], self.state[f"{name}.v"] = m, v
            decayed = p * (1 - lr * self.weight_decay)
            p.copy_(decayed - lr * m / (v.sqrt() + ADAMW_EPS))

    def save_state(self, path: Path) -> None:
        np.savez(path, **{name: t.cpu().numpy() for name, t in self.state.items()})

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        self.state = {name: torch.from_numpy(np.array(v)).to(self.model.device) for name, v in state.items()}
