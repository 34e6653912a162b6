"""nanochat-mlx: run nanochat checkpoints of every generation (g1-g9) with MLX or torch."""

from .engine import Engine, GenerationEvent, GenerationStats, ToolCall
from .errors import CheckpointError, NanochatError
from .loading import load
from .sampling import SamplingParams
from .session import ChatSession, Turn

__version__ = "0.1.0"

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
