"""The reference's SFT schedules (``scripts/chat_sft.py`` at HEAD): learning rate and Muon momentum."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup, constant, linear warmdown to ``final_lr_frac``, over progress 0..1."""

    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0

    def __call__(self, progress: float) -> float:
        if progress < self.warmup_ratio:
            return (progress + 1e-8) / self.warmup_ratio
        if progress <= 1.0 - self.warmdown_ratio:
            return 1.0
        decay = (progress - (1.0 - self.warmdown_ratio)) / self.warmdown_ratio
        return (1 - decay) * 1.0 + decay * self.final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 rising linearly to 0.95 over the first 300 steps (``step`` counts from 0)."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95
