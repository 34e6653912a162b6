"""Build the MLX model from a checkpoint's canonical weights."""

from __future__ import annotations

import sys

import ml_dtypes
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..checkpoint import Checkpoint
from ..model import GPT

MLX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
QUANT_GROUP = 64


def default_dtype() -> str:
    """float32 on the CPU (the parity target), bfloat16 on a GPU."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def device_name() -> str:
    return "gpu (Metal)" if mx.default_device() == mx.gpu else "cpu"


def to_mlx(array: np.ndarray) -> mx.array:
    """A numpy tensor (bfloat16 via ml_dtypes included) as an MLX array, bit-exact."""
    if array.dtype == ml_dtypes.bfloat16:
        return mx.array(array.view(np.uint16)).view(mx.bfloat16)
    return mx.array(array)


def quantizable(path: str, module: nn.Module) -> bool:
    """Linear and embedding layers whose rows split into whole quantization groups."""
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % QUANT_GROUP == 0


def build_mlx_model(ckpt: Checkpoint, dtype: str | None = None, quantize: int | None = None) -> GPT:
    dtype = dtype or default_dtype()
    mdtype = MLX_DTYPES[dtype]
    model = GPT(ckpt.config, ckpt.spec, dtype=mdtype)
    if ckpt.quantization:  # a quantized converted folder: build the quantized shapes first
        nn.quantize(model, group_size=ckpt.quantization["group_size"], bits=ckpt.quantization["bits"], class_predicate=quantizable)
    weights = []
    for name, array in ckpt.weights.items():
        w = to_mlx(array)
        if mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(mdtype)
        weights.append((name, w))
    model.load_weights(weights, strict=True)
    if quantize is not None and not ckpt.quantization:
        if mx.default_device() != mx.gpu:
            print("note: MLX's quantized kernels are slow on the CPU; quantization pays off on Metal", file=sys.stderr)
        nn.quantize(model, group_size=QUANT_GROUP, bits=quantize, class_predicate=quantizable)
    mx.eval(model.parameters())
    model.quantization = quantize or (ckpt.quantization or {}).get("bits")
    return model
