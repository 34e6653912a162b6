"""A scripted MLX "model" for engine tests: it predicts a fixed token at each position.

It runs through the real MLXRunner and Engine (caches, pipelining, sampling); only the network
is replaced, so tool calls, stops and UTF-8 splits can be staged exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from nanochat_mlx.backends.mlx.cache import KVCache


@dataclass
class _Config:
    vocab_size: int
    context_limit: int


class ScriptedModel(nn.Module):
    """Logits that put all mass on ``script[i]`` for the i-th generated position."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int, context_limit: int = 640) -> None:
        super().__init__()
        self.script, self.prompt_len = script, prompt_len
        self.config = _Config(vocab_size, context_limit)
        self.dtype = mx.float32
        self.quantization = None

    def make_runner(self):
        from nanochat_mlx.backends.mlx.runner import MLXRunner

        return MLXRunner(self)

    def make_cache(self) -> list[KVCache]:
        return [KVCache()]

    def decode(self, inputs: mx.array, cache: list) -> mx.array:
        """One decode step, as ``GPT.decode``."""
        return self(inputs[:, None], cache=cache)[:, -1]

    def decode_rows(self, inputs: mx.array, rows: list, lengths: list[int] | None = None) -> mx.array:
        """The batched step of the server's scheduler: each row continues its own script, fed its
        ``lengths[b]`` ids of ``inputs`` (a prompt chunk riding along) or one."""
        ends = list(itertools.accumulate(lengths or [1] * len(rows)))
        spans = zip([0, *ends], ends, strict=False)
        return mx.concatenate(
            [self(inputs[None, a:b], cache=row)[:, -1] for (a, b), row in zip(spans, rows, strict=True)]
        )

    def __call__(self, inputs: mx.array, cache=None, last_only: bool = False) -> mx.array:
        B, T = inputs.shape
        offset = cache[0].offset if cache else 0
        if cache:
            cache[0].update_and_fetch(mx.zeros((B, 1, T, 1)), mx.zeros((B, 1, T, 1)))
        rows = []
        for p in range(offset, offset + T):
            i = p + 1 - self.prompt_len  # index of the token predicted after position p
            token = self.script[i] if 0 <= i < len(self.script) else 0
            rows.append(mx.where(mx.arange(self.config.vocab_size) == token, 10.0, 0.0))
        logits = mx.broadcast_to(mx.stack(rows)[None], (B, T, self.config.vocab_size))
        return logits[:, -1:] if last_only else logits
