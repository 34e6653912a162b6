"""nanochat-mlx: run nanochat checkpoints of every generation (g1-g9) with MLX or torch."""

from .errors import CheckpointError, NanochatError
from .loading import load

__version__ = "0.1.0"

__all__ = ["CheckpointError", "NanochatError", "__version__", "load"]
