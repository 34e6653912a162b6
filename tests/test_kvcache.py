"""The MLX KV caches: attention through them equals attention over the whole history with the window rule."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nanochat_mlx.backends.mlx.cache import KVCache, SmearMemory, WindowKVCache


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, window: int | None) -> np.ndarray:
    """Queries at absolute positions start.. over all keys so far; key j visible iff 0 <= i - j <= window."""
    out = []
    for r in range(q.shape[2]):
        i = start + r
        lo = 0 if window is None else max(0, i - window)
        scores = q[:, :, r : r + 1] @ k[:, :, lo : i + 1].transpose(0, 1, 3, 2)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out.append(weights @ v[:, :, lo : i + 1])
    return np.concatenate(out, axis=2)


def through_cache(cache, q: mx.array, k: mx.array, v: mx.array) -> np.ndarray:
    mask = cache.make_mask(q.shape[2])
    keys, values = cache.update_and_fetch(k, v)
    return np.array(mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask))


@pytest.mark.parametrize("window", [None, 3, 8])
@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 1, 7, 1, 1, 1, 9, 2, 1], [12, 12, 1, 1, 30, 1]])
def test_attention_through_the_cache_follows_the_window_rule(window, chunks):
    rng = np.random.default_rng(len(chunks) * 7 + (window or 0))
    total = sum(chunks)
    q, k, v = (rng.standard_normal((1, 2, total, 4)).astype(np.float32) for _ in range(3))
    cache = KVCache() if window is None else WindowKVCache(window)
    start = 0
    for n in chunks:
        s = slice(start, start + n)
        got = through_cache(cache, mx.array(q[:, :, s]), mx.array(k[:, :, s]), mx.array(v[:, :, s]))
        want = reference_attention(q[:, :, s], k, v, start, window)
        np.testing.assert_allclose(got, want, atol=1e-5)
        start += n
    assert cache.offset == total


def test_window_cache_never_holds_more_than_window_plus_one_in_decode():
    cache = WindowKVCache(4)
    for _ in range(50):
        keys, _ = cache.update_and_fetch(mx.zeros((1, 1, 1, 2)), mx.zeros((1, 1, 1, 2)))
    assert keys.shape[2] == 5 and cache.keys.shape[2] == 5


def test_kv_cache_grows_in_steps_not_per_token():
    cache = KVCache()
    buffers = set()
    for _ in range(100):
        cache.update_and_fetch(mx.zeros((1, 1, 1, 2)), mx.zeros((1, 1, 1, 2)))
        buffers.add(cache.keys.shape[2])
    assert buffers == {256}


def test_trim_rewinds_until_the_window_has_slid():
    cache = WindowKVCache(8)
    cache.update_and_fetch(mx.zeros((1, 1, 6, 2)), mx.zeros((1, 1, 6, 2)))
    assert cache.is_trimmable() and cache.trim(2) == 2 and cache.offset == 4
    cache.update_and_fetch(mx.zeros((1, 1, 10, 2)), mx.zeros((1, 1, 10, 2)))
    assert not cache.is_trimmable() and cache.trim(1) == 0


def test_repeat_copies_one_row_into_many():
    cache, memory = KVCache(), SmearMemory()
    cache.update_and_fetch(mx.ones((1, 2, 3, 4)), mx.ones((1, 2, 3, 4)))
    memory.prev = mx.ones((1, 1, 8))
    cache.repeat(3)
    memory.repeat(3)
    assert cache.state[0].shape == (3, 2, 3, 4) and memory.prev.shape == (3, 1, 8)
    assert not memory.is_trimmable()
