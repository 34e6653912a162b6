"""Sampling options shared by every backend and front end."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import NanochatError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is the reference's greedy decoding (first max wins)."""

    temperature: float = 0.6
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = 42
    max_tokens: int | None = 256

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise NanochatError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise NanochatError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise NanochatError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise NanochatError(f"min-p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise NanochatError(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise NanochatError(f"max tokens must be >= 0, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> SamplingParams:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
