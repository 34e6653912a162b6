"""Build the MLX model from a checkpoint's canonical weights."""

from __future__ import annotations

import sys

import ml_dtypes
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import ArraysCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_repetition_penalty, make_sampler

from ..checkpoint import Checkpoint
from ..model import GPT
from ..sampling import SamplingParams

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


class MLXRunner:
    """The engine's view of an MLX model: lazy forward passes, device-side sampling."""

    name = "mlx"

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.device = device_name()
        self.dtype = {v: k for k, v in MLX_DTYPES.items()}[model.dtype]
        self.context_limit = model.config.rope_len

    def make_cache(self) -> list:
        return self.model.make_cache()

    def cache_length(self, cache: list) -> int:
        return cache[0].offset

    def prefill(self, tokens: list[int], cache: list) -> mx.array:
        logits = self.model(mx.array([tokens]), cache=cache, last_only=True)[:, -1]
        mx.eval(logits, [c.state for c in cache])
        return logits

    def decode(self, tokens: mx.array, cache: list) -> mx.array:
        return self.model(tokens[:, None], cache=cache)[:, -1]

    def expand(self, cache: list, logits: mx.array, n: int) -> tuple[list, mx.array]:
        """Copy a one-row cache (and its logits) into ``n`` rows, as the reference's KVCache.prefill."""
        for c in cache:
            if isinstance(c, ArraysCache):
                c.cache = [None if a is None else mx.repeat(a, n, axis=0) for a in c.cache]
            elif c.keys is not None:
                c.keys, c.values = mx.repeat(c.keys, n, axis=0), mx.repeat(c.values, n, axis=0)
        return cache, mx.repeat(logits, n, axis=0)

    def sampler(self, params: SamplingParams):
        """(logits (B, V), row histories or None) -> lazy ids (B,), built from mlx-lm's samplers."""
        if params.seed is not None:
            mx.random.seed(params.seed)
        pick = make_sampler(
            temp=params.temperature,
            top_p=params.top_p if params.top_p < 1.0 else 0.0,
            min_p=params.min_p,
            top_k=params.top_k or 0,
        )
        penalty = make_repetition_penalty(params.repetition_penalty) if params.repetition_penalty != 1.0 else None

        def sample(logits: mx.array, histories: list[list[int]] | None) -> mx.array:
            if penalty is not None and histories:
                logits = mx.concatenate(
                    [penalty(mx.array(h), logits[i : i + 1]) for i, h in enumerate(histories)], axis=0
                )
            if params.greedy:
                return mx.argmax(logits, axis=-1)
            return pick(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

        return sample

    def tokens(self, ids: list[int]) -> mx.array:
        return mx.array(ids)

    def schedule(self, ids: mx.array) -> None:
        mx.async_eval(ids)

    def to_list(self, ids: mx.array) -> list[int]:
        return ids.tolist()

    def trim(self, cache: list, n: int) -> bool:
        if any(isinstance(c, ArraysCache) for c in cache) or not can_trim_prompt_cache(cache):
            return False
        return trim_prompt_cache(cache, n) == n

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory(self) -> int:
        return int(mx.get_peak_memory())
