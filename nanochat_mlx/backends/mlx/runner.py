"""The engine's runner for the MLX model: lazy forward passes, device-side sampling."""

from __future__ import annotations

import mlx.core as mx

from ...sampling import SamplingParams
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
        return self.model(tokens[:, None], cache=cache)[:, -1]

    def decode_rows(self, tokens: list[int], caches: list[list]) -> mx.array:
        """One decode step of independent one-row caches at their own positions: logits (B, V)."""
        return self.model.decode_rows(mx.array(tokens), caches)

    def clone_cache(self, cache: list) -> list:
        return [c.clone() for c in cache]

    def cache_bytes(self, cache: list) -> int:
        return sum(c.nbytes for c in cache)

    def expand(self, cache: list, logits: mx.array, n: int) -> tuple[list, mx.array]:
        """Copy a one-row cache (and its logits) into ``n`` rows, as the reference's KVCache.prefill."""
        for c in cache:
            c.repeat(n)
        return cache, mx.repeat(logits, n, axis=0)

    def sampler(self, params: SamplingParams):
        """(logits (B, V), row histories or None) -> lazy ids (B,)."""
        return make_sampler(params)

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


REPETITION_WINDOW = 64  # recent tokens the repetition penalty looks at


def make_sampler(params: SamplingParams):
    """A device-side sampler: greedy (first max), or temperature with top-k / top-p / min-p.

    Randomness comes from a key seeded by ``params.seed`` and split per step, so the same seed
    gives the same tokens whatever else uses MLX's global generator.
    """
    key = mx.random.key(params.seed) if params.seed is not None else None

    def penalize(logits: mx.array, histories: list[list[int]]) -> mx.array:
        rows = []
        for i, history in enumerate(histories):
            row = logits[i]
            ids = mx.array(sorted(set(history[-REPETITION_WINDOW:])))
            picked = row[ids]
            row[ids] = mx.where(picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty)
            rows.append(row)
        return mx.stack(rows)

    def sample(logits: mx.array, histories: list[list[int]] | None) -> mx.array:
        nonlocal key
        if params.repetition_penalty != 1.0 and histories:
            logits = penalize(logits, histories)
        if params.greedy:
            return mx.argmax(logits, axis=-1)
        logits = logits / params.temperature
        vocab = logits.shape[-1]
        if params.top_k and params.top_k < vocab:
            kth = mx.topk(logits, params.top_k, axis=-1).min(axis=-1, keepdims=True)
            logits = mx.where(logits < kth, -mx.inf, logits)
        if params.min_p > 0 or params.top_p < 1.0:
            probs = mx.softmax(logits, axis=-1)
            if params.min_p > 0:
                logits = mx.where(probs < params.min_p * probs.max(axis=-1, keepdims=True), -mx.inf, logits)
            if params.top_p < 1.0:
                order = mx.argsort(-probs, axis=-1)
                sorted_probs = mx.take_along_axis(probs, order, axis=-1)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                drop_sorted = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) >= params.top_p
                drop = mx.take_along_axis(drop_sorted, mx.argsort(order, axis=-1), axis=-1)
                logits = mx.where(drop, -mx.inf, logits)
        if key is None:
            return mx.random.categorical(logits)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logits, key=sub)

    return sample
