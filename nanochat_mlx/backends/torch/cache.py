"""The torch backend's preallocated KV caches: full-attention slots and windowed rings."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .model import TorchGPT

CACHE_STEP = 256  # full-attention caches grow by whole steps of this many positions (and by half at least)


class Slots(NamedTuple):
    """What the layers of one window size attend to in one forward call, and where they store it.

    Without a cache only ``mask``/``causal`` matter. With one, in the ``stored`` case the new keys
    go to the slots ``write`` (a slice) and the keys attended to are ``buffer[read]``; otherwise (a
    windowed layer fed several positions past its ring) they are the first ``old`` stored slots
    followed by the new keys, and the new positions ``keep`` are then stored at the slot indices
    ``write`` (a tensor).
    """

    mask: torch.Tensor | None = None  # bool (T, keys): True = visible
    causal: bool = False
    capacity: int = 0  # slots each layer's buffers must have
    stored: bool = True
    write: slice | torch.Tensor = slice(None)
    read: slice = slice(None)
    old: int = 0
    keep: slice = slice(None)


class RowPlan(NamedTuple):
    """One row of a batched step (``TorchGPT.decode_rows``): its new positions and their plans."""

    length: int
    plans: dict[int | None, Slots]


def visible(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool mask (Tq, Tk) of absolute positions: key j visible to query i iff 0 <= i - j <= w."""
    distance = queries[:, None] - keys[None, :]
    return (distance >= 0) & (distance <= window) if window is not None else distance >= 0


class KVCache:
    """Preallocated keys/values per layer, (B, n_kv_head, slots, head_dim), plus g9's smear memory.

    A full-attention layer (window None) stores position p in slot p; its buffers grow by at least
    ``CACHE_STEP`` slots and by half their size, never per token. A windowed layer stores p in slot
    p % (w+1), the w+1 keys its queries can see, so it never grows past w+1 slots. All layers hold
    the same positions ``0..length-1`` for every row.
    """

    def __init__(self, model: TorchGPT, batch: int = 1) -> None:
        config = model.config
        self.limit = config.context_limit
        self.shape = (batch, config.n_kv_head, config.head_dim)
        self.dtype, self.device = model.dtype, model.device
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.capacity = dict.fromkeys(model.window_sizes, 0)  # slots per window size (None: full attention)
        # g9: the previous position's pre-smear embedding (B, 1, n_embd), and every id fed so far,
        # from which trim() rebuilds that embedding.
        self.smear = model.spec.smear
        self.smear_prev: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.shape[0]

    def plan(self, T: int) -> dict[int | None, Slots]:
        """How each window size's layers store and read ``T`` new positions (shared by those layers)."""
        start, end = self.length, self.length + T
        plans = {}
        for w in self.capacity:
            limit = self.limit if w is None else w + 1
            capacity = self._grown(self.capacity[w], min(end, limit), limit)
            self.capacity[w] = capacity
            if end <= limit:  # no slot is reused yet: the keys are slots 0..end-1 in order
                mask = None
                if T > 1 and start > 0:
                    mask = visible(self._arange(start, end), self._arange(0, end), None)
                plans[w] = Slots(mask, T > 1 and not start, capacity, write=slice(start, end), read=slice(0, end))
            elif T == 1:  # decode on a full ring: overwrite the oldest key, attend to all w+1
                slot = start % (w + 1)
                plans[w] = Slots(capacity=capacity, write=slice(slot, slot + 1))
            else:
                old = min(start, w + 1)
                slots = self._arange(0, old)
                # Slot s holds the latest position p < start with p % (w+1) == s.
                old_positions = start - 1 - torch.remainder(start - 1 - slots, w + 1)
                positions = torch.cat([old_positions, self._arange(start, end)])
                kept = min(T, w + 1)
                plans[w] = Slots(
                    visible(self._arange(start, end), positions, w),
                    capacity=capacity,
                    stored=False,
                    write=torch.remainder(self._arange(end - kept, end), w + 1),
                    old=old,
                    keep=slice(T - kept, T),
                )
        return plans

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values (B, Hkv, T, D); the keys and values to attend to."""
        kb, vb = self.keys[layer], self.values[layer]
        if kb is None or kb.shape[2] < slots.capacity:
            kb, vb = self._resize(kb, slots.capacity), self._resize(vb, slots.capacity)
            self.keys[layer], self.values[layer] = kb, vb
        if slots.stored:
            kb[:, :, slots.write] = k
            vb[:, :, slots.write] = v
            return kb[:, :, slots.read], vb[:, :, slots.read]
        keys = torch.cat([kb[:, :, : slots.old], k], 2) if slots.old else k
        values = torch.cat([vb[:, :, : slots.old], v], 2) if slots.old else v
        kb.index_copy_(2, slots.write, k[:, :, slots.keep])
        vb.index_copy_(2, slots.write, v[:, :, slots.keep])
        return keys, values

    def advance(self, ids: torch.Tensor) -> None:
        """Account for the positions of ``ids`` (B, T), stored by every layer."""
        T = ids.shape[1]
        if self.smear:
            if self.ids is None or self.ids.shape[1] < self.length + T:
                size = self._grown(0 if self.ids is None else self.ids.shape[1], self.length + T, self.limit)
                grown = torch.zeros(self.batch, size, dtype=ids.dtype, device=self.device)
                if self.ids is not None:
                    grown[:, : self.length] = self.ids[:, : self.length]
                self.ids = grown
            self.ids[:, self.length : self.length + T] = ids
        self.length += T

    def expand(self, n: int) -> KVCache:
        """Copy this one-row cache into ``n`` rows (the smear memory included)."""
        if self.batch != 1:
            raise ValueError(f"expand needs a one-row cache, this one has {self.batch} rows")
        self.keys = [None if t is None else t.repeat(n, 1, 1, 1) for t in self.keys]
        self.values = [None if t is None else t.repeat(n, 1, 1, 1) for t in self.values]
        self.smear_prev = None if self.smear_prev is None else self.smear_prev.repeat(n, 1, 1)
        self.ids = None if self.ids is None else self.ids.repeat(n, 1)
        self.shape = (n, *self.shape[1:])
        return self

    def clone(self) -> KVCache:
        """An independent copy (a prompt-cache entry handed to a request, or one of n samples' rows)."""
        new = copy.copy(self)
        new.keys = [None if t is None else t.clone() for t in self.keys]
        new.values = [None if t is None else t.clone() for t in self.values]
        new.capacity = dict(self.capacity)
        new.smear_prev = None if self.smear_prev is None else self.smear_prev.clone()
        new.ids = None if self.ids is None else self.ids.clone()
        return new

    @property
    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.smear_prev, self.ids]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def trim(self, n: int) -> bool:
        """Forget the last ``n`` positions, unless a windowed layer already overwrote keys still needed.

        The caller rebuilds ``smear_prev`` (see ``TorchGPT.trim_cache``).
        """
        new = self.length - n
        if n < 0 or new < 0:
            return False
        for w in self.capacity:
            # A ring of w+1 slots holds positions >= length - w - 1; the next query needs those >= new - w.
            if w is not None and max(0, new - w) < max(0, self.length - w - 1):
                return False
        self.length = new
        return True

    def _arange(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device)

    @staticmethod
    def _grown(capacity: int, need: int, limit: int) -> int:
        if need <= capacity:
            return capacity
        size = max(need, capacity + capacity // 2)
        return min(limit, -(-size // CACHE_STEP) * CACHE_STEP)

    def _resize(self, buffer: torch.Tensor | None, slots: int) -> torch.Tensor:
        # Zeros rather than empty: slots not written yet are never attended to, but stay finite anyway.
        grown = torch.zeros(self.shape[0], self.shape[1], slots, self.shape[2], dtype=self.dtype, device=self.device)
        if buffer is not None:
            grown[:, :, : buffer.shape[2]] = buffer
        return grown
