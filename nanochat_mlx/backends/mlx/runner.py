"""The engine's runner for the MLX model: lazy forward passes, device-side sampling."""

from __future__ import annotations

import mlx.core as mx

from ...sampling import Sampler, SamplingParams
from .model import GPT, MLX_DTYPES, device_name


class MLXRunner:
    """The engine's view of an MLX model: lazy forward passes, device-side sampling."""

    name = "mlx"

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.device = device_name()
        self.dtype = {v: k for k, v in MLX_DTYPES.items()}[model.dtype]
        self.context_limit = model.config.context_limit

    def make_cache(self) -> list:
        return self.model.make_cache()

    def cache_length(self, cache: list) -> int:
        return cache[0].offset

    def prefill(self, tokens: list[int], cache: list) -> mx.array:
        if len(tokens) > 1:
            # Evaluating only the caches lets MLX skip what they don't depend on (the last layer's
            # MLP, the final norm and head) for all but the last token, as mlx-lm's prefill does.
            self.model(mx.array([tokens[:-1]]), cache=cache)
            mx.eval([c.state for c in cache])
        logits = self.model(mx.array([tokens[-1:]]), cache=cache)[:, -1]
        mx.eval(logits, [c.state for c in cache])
        return logits

    def decode(self, tokens: mx.array, cache: list) -> mx.array:
        return self.model.decode(tokens, cache)

    def prompt_logits(self, tokens: list[int], cache: list) -> mx.array:
        """Run a chunk like ``prefill``, keeping every position's logits (T, V): to score a prompt."""
        logits = self.model(mx.array([tokens]), cache=cache)[0]
        mx.eval(logits, [c.state for c in cache])
        return logits

    def prepare_rows(self, max_rows: int) -> dict:
        """Nothing to measure: MLX runs one matrix-product kernel whatever the row count."""
        return {}

    def decode_rows(self, tokens: list[int], caches: list[list], lengths: list[int] | None = None) -> mx.array:
        """One step of independent one-row caches at their own positions, each fed ``lengths[b]``
        of ``tokens`` (default one): logits (B, V) of each row's last token."""
        return self.model.decode_rows(mx.array(tokens), caches, lengths)

    def clone_cache(self, cache: list) -> list:
        return [c.clone() for c in cache]

    def cache_bytes(self, cache: list) -> int:
        return sum(c.nbytes for c in cache)

    def expand(self, cache: list, logits: mx.array, n: int) -> tuple[list, mx.array]:
        """Copy a one-row cache (and its logits) into ``n`` rows, as the reference's KVCache.prefill."""
        for c in cache:
            c.repeat(n)
        return cache, mx.repeat(logits, n, axis=0)

    def sampler(self, params: SamplingParams, rows: list[list[int]]) -> Sampler:
        """The sampling policy on MLX arrays, for rows whose tokens so far are ``rows``."""
        return Sampler(MLX_OPS, params, rows)

    @property
    def pipelined(self) -> bool:
        """MLX evaluates lazily: the next step can be scheduled before a token is read back."""
        return True

    def tokens(self, ids: list[int]) -> mx.array:
        return mx.array(ids)

    def schedule(self, ids: mx.array) -> None:
        mx.async_eval(ids)

    def to_list(self, ids: mx.array) -> list[int]:
        return ids.tolist()

    def trim(self, cache: list, n: int) -> bool:
        if not all(c.is_trimmable() for c in cache):
            return False
        return all(c.trim(n) == n for c in cache)

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory(self) -> int:
        return int(mx.get_peak_memory())


class _Key:
    """A PRNG key split once per sampled column: the same seed gives the same tokens, whatever else
    draws from MLX's global generator."""

    def __init__(self, seed: int | None) -> None:
        self.key = mx.random.key(seed) if seed is not None else None

    def next(self) -> mx.array | None:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub


class MLXOps:
    """The sampling policy's primitives (``nanochat_mlx.sampling.ArrayOps``) on MLX arrays."""

    ids = staticmethod(lambda rows: mx.array(rows, dtype=mx.int32))
    push = staticmethod(lambda h, col: mx.concatenate([h[:, 1:], col[:, None].astype(h.dtype)], axis=1))
    gather = staticmethod(lambda logits, ids: mx.take_along_axis(logits, ids, axis=-1))
    scatter = staticmethod(lambda logits, ids, values: mx.put_along_axis(logits, ids, values, axis=-1))
    where = staticmethod(mx.where)
    argmax = staticmethod(lambda logits: mx.argmax(logits, axis=-1))
    kth_largest = staticmethod(lambda logits, k: mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True))
    softmax = staticmethod(lambda x: mx.softmax(x, axis=-1))
    log_softmax = staticmethod(lambda x: (x := x.astype(mx.float32)) - mx.logsumexp(x, axis=-1, keepdims=True))
    row_max = staticmethod(lambda x: x.max(axis=-1, keepdims=True))
    cumsum = staticmethod(lambda x: mx.cumsum(x, axis=-1))
    unsort = staticmethod(lambda values, order: mx.take_along_axis(values, mx.argsort(order, axis=-1), axis=-1))
    rng = staticmethod(_Key)

    @staticmethod
    def sort_descending(x: mx.array) -> tuple[mx.array, mx.array]:
        order = mx.argsort(-x, axis=-1)
        return mx.take_along_axis(x, order, axis=-1), order

    @staticmethod
    def top(x: mx.array, k: int) -> tuple[mx.array, mx.array]:
        ids = mx.argpartition(-x, k - 1, axis=-1)[:, :k]  # the k largest, in no order: then sort those
        values = mx.take_along_axis(x, ids, axis=-1)
        order = mx.argsort(-values, axis=-1)
        return mx.take_along_axis(values, order, axis=-1), mx.take_along_axis(ids, order, axis=-1)

    @staticmethod
    def categorical(logits: mx.array, rng: _Key) -> mx.array:
        key = rng.next()
        return mx.random.categorical(logits) if key is None else mx.random.categorical(logits, key=key)


MLX_OPS = MLXOps()
