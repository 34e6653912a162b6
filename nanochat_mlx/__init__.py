"""nanochat-mlx: run nanochat checkpoints of every generation (g1-g9) with MLX or torch.

The public names load on first use (PEP 562), so ``import nanochat_mlx`` and the CLI's
``--version``/``--help`` don't pay for numpy, ml_dtypes and the backends, and a Ctrl-C at
startup lands in the CLI's guard rather than in the middle of an import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "ChatSession": ".session",
    "CheckpointError": ".errors",
    "Engine": ".engine",
    "GenerationEvent": ".engine",
    "GenerationStats": ".engine",
    "NanochatError": ".errors",
    "SamplingParams": ".sampling",
    "ToolCall": ".engine",
    "Turn": ".session",
    "load": ".loading",
}

__all__ = [
    "ChatSession",
    "CheckpointError",
    "Engine",
    "GenerationEvent",
    "GenerationStats",
    "NanochatError",
    "SamplingParams",
    "ToolCall",
    "Turn",
    "__version__",
    "load",
]

if TYPE_CHECKING:
    from .engine import Engine, GenerationEvent, GenerationStats, ToolCall
    from .errors import CheckpointError, NanochatError
    from .loading import load
    from .sampling import SamplingParams
    from .session import ChatSession, Turn


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
