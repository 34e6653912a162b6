"""LoRA as both backends do it: which layers, the adapters' names, init and file, the optimizer, fusing.

An adapted linear layer computes ``base(x) + scale * (x @ A) @ B`` with A (in x r) drawn uniformly
in +-1/sqrt(in) and B (r x out) zero, so training starts from the base model exactly; ``scale`` is
alpha / rank. The adapters are named after the canonical layer (``transformer.h.3.attn.c_q.lora_a``),
float32, and A is drawn from a generator seeded by the run's seed and that name, so the MLX and the
torch model start from the same adapters and read each other's ``adapters.safetensors``.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NanochatError

TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc")
LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's, by target
ADAPTERS, CONFIG = "adapters.safetensors", "adapter_config.json"
# Plain AdamW as mlx.optimizers.AdamW computes it (its defaults; no bias correction).
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.999), 1e-8


def chosen_layers(n_layer: int, rank: int, layers: int, targets: tuple[str, ...]) -> list[str]:
    """The canonical paths (``transformer.h.3.attn.c_q``) of ``targets`` in the last ``layers`` blocks."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise NanochatError(f"unknown LoRA target {unknown[0]!r} (choose from {', '.join(TARGETS)})")
    if rank < 1:
        raise NanochatError(f"--lora-rank must be >= 1, got {rank}")
    first = 0 if layers < 0 else max(n_layer - layers, 0)
    return [f"transformer.h.{i}.{p}" for i in range(first, n_layer) for p in LINEARS if p.split(".")[-1] in targets]


def initial_a(seed: int, path: str, in_dims: int, rank: int) -> np.ndarray:
    """The adapter A of layer ``path``: uniform in +-1/sqrt(in), from (seed, path) alone."""
    bound = 1 / math.sqrt(in_dims)
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    return rng.uniform(-bound, bound, (in_dims, rank)).astype(np.float32)


def save_adapters(directory: Path, adapters: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(a, np.float32) for name, a in adapters.items()}, str(directory / ADAPTERS))
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_adapters(directory: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The adapters in ``directory``, checked against the names and shapes of the run's."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = directory / ADAPTERS
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise NanochatError(f"{path}: cannot read the adapters ({e})") from None
    if {n: tuple(a.shape) for n, a in weights.items()} != expected:
        raise NanochatError(f"{path}: the adapters do not match --lora-rank/--lora-layers/--lora-targets of the run")
    return weights


def fuse(base: Any, adapters: dict[str, np.ndarray], scale: float) -> None:
    """Add each adapter pair's ``scale * (A B)^T`` to the matching weight of ``base`` (either backend,
    unquantized)."""
    from . import _backend

    backend = _backend(base)
    params = backend.parameters(base)
    fused = dict(params)
    for name in adapters:
        if name.endswith(".lora_a"):
            layer = name.removesuffix(".lora_a")
            delta = scale * (adapters[name] @ adapters[f"{layer}.lora_b"]).T
            weight = params[f"{layer}.weight"]
            fused[f"{layer}.weight"] = backend.from_numpy(backend.to_numpy(weight) + delta, weight)
    backend.assign(base, fused)
