"""KV caches for the MLX model, following mlx-lm's cache protocol.

``offset``, ``update_and_fetch``, ``make_mask``, ``state``, ``is_trimmable`` and ``trim`` are
what ``mlx_lm.generate.generate_step`` and our engine use. We keep our own small classes rather
than importing ``mlx_lm.models.cache``: importing any mlx-lm module runs its package ``__init__``,
which imports transformers (and torch where installed), seconds of start-up for a chat command.

nanochat's window rule: the query at absolute position i sees keys j with ``0 <= i - j <= w``,
so a windowed layer needs at most w+1 keys; "L" layers use w = sequence_len and slide too.
"""

from __future__ import annotations

import copy

import mlx.core as mx

STEP = 256  # grow buffers in chunks so decode never reallocates per token


def causal_mask(n: int, offset: int, window: int | None = None) -> mx.array:
    """Boolean (n, offset + n) mask: query r (absolute offset + r) sees key j iff j <= offset + r
    and, with a window, offset + r - j <= window."""
    q = mx.arange(offset, offset + n)[:, None]
    k = mx.arange(offset + n)[None]
    mask = q >= k
    if window is not None:
        mask = mask & (q - k <= window)
    return mask


class _Arrays:
    """Copying and sizing shared by the caches: every ``mx.array`` attribute is the cache's data."""

    def clone(self):
        """An independent copy (a prompt-cache entry handed to a request, or one of n samples' rows).

        MLX arrays are values: assigning into a slice of the copy's buffer never changes the original.
        """
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, mx.array):
                setattr(new, name, mx.array(value))
        return new

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, mx.array))


class KVCache(_Arrays):
    """Every key and value so far, in preallocated buffers grown STEP positions at a time."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        end = self.offset + n
        if self.keys is None or end > self.keys.shape[2]:
            grow = -(-end // STEP) * STEP - (0 if self.keys is None else self.offset)
            new_k = mx.zeros((*keys.shape[:2], grow, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((*values.shape[:2], grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def slot(self) -> tuple[int, int] | None:
        """Where one more position goes in the buffers and how many entries are then visible;
        None when the buffers must grow first (an ``update_and_fetch`` step does that)."""
        if self.keys is None or self.offset >= self.keys.shape[2]:
            return None
        return self.offset, self.offset + 1

    def advance(self) -> None:
        """Account for the position just written at ``slot()``."""
        self.offset += 1

    def make_mask(self, n: int) -> mx.array | str | None:
        if n == 1:
            return None
        return "causal" if self.offset == 0 else causal_mask(n, self.offset)

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    def repeat(self, n: int) -> None:
        """Copy a one-row cache into n rows (num_samples from one prefill)."""
        if self.keys is not None:
            self.keys, self.values = mx.repeat(self.keys, n, axis=0), mx.repeat(self.values, n, axis=0)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


class WindowKVCache(_Arrays):
    """The last ``window + 1`` keys and values: a ring buffer in decode, temporal order in prefill."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.size = window + 1
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._filled = 0  # valid entries in the buffers
        self._start = 0  # ring index of the oldest entry once the buffer is full

    def _ordered(self, a: mx.array) -> mx.array:
        if self._start == 0:
            return a[..., : self._filled, :]
        return mx.concatenate([a[..., self._start : self._filled, :], a[..., : self._start, :]], axis=2)

    def slot(self) -> tuple[int, int] | None:
        """As ``KVCache.slot``: once full, the oldest entry is overwritten and all w+1 stay visible
        (attention does not depend on their order)."""
        if self.keys is None:
            return None
        if self._filled == self.size:
            return self._start, self.size
        if self._start == 0 and self._filled < self.keys.shape[2]:
            return self._filled, self._filled + 1
        return None

    def advance(self) -> None:
        self.offset += 1
        if self._filled == self.size:
            self._start = (self._start + 1) % self.size
        else:
            self._filled += 1

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        slot = self.slot() if n == 1 else None
        if slot is not None:
            index, visible = slot
            self.keys[..., index, :] = keys[..., 0, :]
            self.values[..., index, :] = values[..., 0, :]
            self.advance()
            return self.keys[..., :visible, :], self.values[..., :visible, :]
        self.offset += n
        # A chunk (or a full buffer): the previous `window` keys then the new ones, in order.
        if self.keys is not None:
            keys = mx.concatenate([self._ordered(self.keys)[..., -self.window :, :], keys], axis=2)
            values = mx.concatenate([self._ordered(self.values)[..., -self.window :, :], values], axis=2)
        kept = min(keys.shape[2], self.size)
        capacity = min(self.size, -(-(kept + 1) // STEP) * STEP)
        pad = [(0, 0), (0, 0), (0, capacity - kept), (0, 0)]
        self.keys = mx.pad(keys[..., -kept:, :], pad) if capacity > kept else keys[..., -kept:, :]
        self.values = mx.pad(values[..., -kept:, :], pad) if capacity > kept else values[..., -kept:, :]
        self._filled, self._start = kept, 0
        return keys, values

    def make_mask(self, n: int) -> mx.array | str | None:
        if n == 1:
            return None
        previous = min(self.offset, self.window)
        if previous + n <= self.size:
            return "causal" if previous == 0 else causal_mask(n, previous)
        return causal_mask(n, previous, self.window)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    def repeat(self, n: int) -> None:
        if self.keys is not None:
            self.keys, self.values = mx.repeat(self.keys, n, axis=0), mx.repeat(self.values, n, axis=0)

    def is_trimmable(self) -> bool:
        return self.offset == self._filled  # nothing has slid out of the window yet

    def trim(self, n: int) -> int:
        if not self.is_trimmable():
            return 0
        n = min(self.offset, n)
        self.offset -= n
        self._filled -= n
        return n


class SmearMemory(_Arrays):
    """g9's smear state: the pre-smear normed embedding of the last position seen."""

    def __init__(self) -> None:
        self.prev: mx.array | None = None
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        return [] if self.prev is None else [self.prev]

    def repeat(self, n: int) -> None:
        if self.prev is not None:
            self.prev = mx.repeat(self.prev, n, axis=0)

    def is_trimmable(self) -> bool:
        return False  # the embedding before the cut is gone

    def trim(self, n: int) -> int:
        return 0
