"""Backends: MLX (default on Apple Silicon) and torch (CUDA, MPS, fast x86 CPU)."""

from __future__ import annotations

import importlib.util
import platform

from ..errors import NanochatError

BACKENDS = ("auto", "mlx", "torch")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def pick_backend(name: str) -> str:
    """Resolve "auto": MLX on Apple Silicon, torch with CUDA, torch if installed, else MLX."""
    if name not in BACKENDS:
        raise NanochatError(f"unknown backend {name!r} (choose {', '.join(BACKENDS)})")
    if name == "torch" and not torch_available():
        raise NanochatError("the torch backend needs PyTorch: pip install 'nanochat-mlx[torch]'")
    if name != "auto":
        return name
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "mlx"
    return "torch" if torch_available() else "mlx"
