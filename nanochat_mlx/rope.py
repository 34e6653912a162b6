"""Rotary tables exactly as the reference builds them (shared by the MLX and torch backends)."""

from __future__ import annotations

import ml_dtypes
import numpy as np


def rotary_inv_freq(head_dim: int, base: float) -> np.ndarray:
    """float32 inverse frequencies 1 / base^(2j/D), rounded as torch's float32 pow rounds them.

    base ** e rounded once from float64 matches torch for head_dim 128 and the fixtures; numpy's
    float32 pow is off by an ulp in places, enough to flip bf16 roundings of the tables.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return np.float32(1.0) / (np.float64(base) ** exponents.astype(np.float64)).astype(np.float32)


def rotary_tables(head_dim: int, length: int, base: float, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables of shape (length, head_dim // 2), float32.

    t * inv_freq is a float32 product, as in torch; cos/sin are taken in float64
    and rounded to float32, then to bfloat16 for the generations that keep bf16 tables (g1-g6),
    which reproduces torch's tables where numpy's float32 cos/sin would flip bf16 roundings.
    """
    inv_freq = rotary_inv_freq(head_dim, base)
    freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq).astype(np.float32)
    cos = np.cos(freqs.astype(np.float64)).astype(np.float32)
    sin = np.sin(freqs.astype(np.float64)).astype(np.float32)
    if bf16:
        cos = cos.astype(ml_dtypes.bfloat16).astype(np.float32)
        sin = sin.astype(ml_dtypes.bfloat16).astype(np.float32)
    return cos, sin
