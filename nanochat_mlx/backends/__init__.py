"""Backends: MLX (default on Apple Silicon) and torch (CUDA, MPS, fast x86 CPU).

Each backend package holds the same three files: ``model.py`` (the GPT and how it is built from a
checkpoint), ``cache.py`` (its KV caches) and ``runner.py`` (what the engine calls).
"""

from __future__ import annotations

import importlib.util
import platform
from typing import Any

from ..errors import NanochatError
from ..options import BACKENDS


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def pick_backend(name: str, ckpt: Any = None) -> str:
    """Resolve "auto": MLX on Apple Silicon, torch if installed (CUDA, MPS or a fast CPU), else MLX;
    MLX for ``ckpt`` a folder of MLX-quantized weights, which only MLX runs."""
    if name not in BACKENDS:
        raise NanochatError(f"unknown backend {name!r} (choose {', '.join(BACKENDS)})")
    if name == "torch" and not torch_available():
        raise NanochatError("the torch backend needs PyTorch: pip install 'nanochat-mlx[torch]'")
    if name != "auto":
        return name
    if ckpt is not None and ckpt.quantization:
        return "mlx"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "mlx"
    return "torch" if torch_available() else "mlx"


def build_model(ckpt: Any, backend: str, dtype: str | None = None, quantize: int | None = None) -> Any:
    """The model for a checkpoint on a resolved backend ("mlx" or "torch")."""
    if backend == "torch":
        from .torch.model import build_torch_model

        return build_torch_model(ckpt, dtype=dtype, quantize=quantize)
    from .mlx.model import build_mlx_model

    return build_mlx_model(ckpt, dtype=dtype, quantize=quantize)


def describe_backend(requested: str, ckpt: Any = None) -> str:
    """Which backend ``requested`` resolves to here (for ``ckpt``), on which device with which default dtype."""
    name = pick_backend(requested, ckpt)
    if name == "torch":
        from .torch.model import default_device, default_dtype

        device = default_device()
        return f"torch on {device.type}, {default_dtype(device)} ({requested})"
    from .mlx.model import default_dtype, device_name

    return f"mlx on {device_name()}, {default_dtype()} ({requested})"


def backend_hint(backend: str, device: str) -> str | None:
    """A one-line tip when the slow path runs: MLX on a CPU (x86 Linux) without torch installed."""
    if backend != "mlx" or device != "cpu" or torch_available() or platform.system() == "Darwin":
        return None
    return (
        "MLX runs on the CPU here, several times slower than PyTorch on this machine: "
        "pip install 'nanochat-mlx[torch]' for the fast backend"
    )
