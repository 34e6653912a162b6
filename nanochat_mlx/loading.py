"""``load(source)``: a checkpoint in any layout -> (model, tokenizer) on the chosen backend."""

from __future__ import annotations

from typing import Any

from .checkpoint import Checkpoint, read_checkpoint
from .errors import NanochatError

DTYPES = ("float32", "bfloat16", "float16")
QUANT_BITS = (4, 8)


def load(
    source: str,
    *,
    step: int | None = None,
    arch: str | None = None,
    dtype: str | None = None,
    quantize: int | None = None,
    backend: str = "mlx",
) -> tuple[Any, Any]:
    """Load a nanochat checkpoint as ``(model, tokenizer)``.

    ``dtype`` defaults to float32 on CPUs and bfloat16 on GPUs; ``quantize`` (4 or 8) quantizes
    the MLX model's linear and embedding layers; ``backend`` is "mlx", "torch" or "auto".
    """
    check_options(dtype, quantize)
    ckpt = read_checkpoint(source, step=step, arch=arch)
    model = build_model(ckpt, dtype=dtype, quantize=quantize, backend=backend)
    return model, ckpt.tokenizer


def check_options(dtype: str | None, quantize: int | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise NanochatError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    if quantize is not None and quantize not in QUANT_BITS:
        raise NanochatError(f"unsupported quantization {quantize!r} (choose 4 or 8 bits)")


def build_model(ckpt: Checkpoint, dtype: str | None = None, quantize: int | None = None, backend: str = "mlx") -> Any:
    """Build the model for ``ckpt`` on ``backend``."""
    from .backends import pick_backend

    name = pick_backend(backend)
    if name == "torch":
        from .backends.torch.model import build_torch_model

        return build_torch_model(ckpt, dtype=dtype, quantize=quantize)
    from .backends.mlx.model import build_mlx_model

    return build_mlx_model(ckpt, dtype=dtype, quantize=quantize)
