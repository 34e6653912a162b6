"""Prompt cache across requests: an LRU of KV caches keyed by the tokens they hold, bounded in bytes.

Chat clients resend the whole conversation every turn. The cache a finished request leaves holds
its prompt and reply, so the next turn's prompt starts with those tokens: only its new tokens are
prefilled. Entries are handed out as copies (two requests may share a system prompt), trimmed back
to the common prefix when the backend can trim (a sliding window that already slid, or MLX's g9
smear memory, cannot: then only an entry that is a whole prefix of the prompt is used).
All calls come from the scheduler's model thread.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """KV caches of earlier requests, least recently used first out, at most ``max_bytes`` in all."""

    def __init__(self, runner: Any, max_bytes: int) -> None:
        self.runner = runner
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[Any, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, tokens: list[int]) -> tuple[Any, int]:
        """A cache holding the longest cached prefix of ``tokens`` (never all of them), and its length."""
        limit = len(tokens) - 1  # at least one prompt token must run to give fresh logits
        matches = sorted(((common_prefix(k, tokens), k) for k in self._entries), reverse=True)
        for common, key in matches:
            use = min(common, limit)
            if use == 0:
                break
            cache = self.runner.clone_cache(self._entries[key][0])
            if use == len(key) or self.runner.trim(cache, len(key) - use):
                self._entries.move_to_end(key)
                return cache, use
        return self.runner.make_cache(), 0

    def store(self, tokens: list[int], cache: Any) -> None:
        """Keep ``cache`` (holding exactly ``tokens``); entries it extends are dropped, then the oldest."""
        if not tokens or self.max_bytes <= 0:
            return
        size = self.runner.cache_bytes(cache)
        if size > self.max_bytes:
            return
        key = tuple(tokens)
        for old in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(old)
        self._entries[key] = (cache, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        _, size = self._entries.pop(key)
        self.bytes -= size
