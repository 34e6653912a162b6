"""Every model and sampling option, validated once: the same message from the CLI, TUI, server and API."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .errors import NanochatError

DTYPES = ("float32", "bfloat16", "float16")
QUANT_BITS = (4, 8)
BACKENDS = ("auto", "mlx", "torch")
GENERATIONS = tuple(f"g{i}" for i in range(1, 10))


def finite(name: str, value: float) -> float:
    """``value`` as a float, refusing NaN and infinities (argparse's ``float`` accepts them)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise NanochatError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise NanochatError(f"{name} must be a finite number, got {value!r}")
    return number


def whole(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise NanochatError(f"{name} must be a whole number, got {value!r}")
    return value


@dataclass(frozen=True)
class LoadOptions:
    """Which checkpoint to load and how: the six model options every front end takes."""

    source: str
    step: int | None = None
    arch: str | None = None
    dtype: str | None = None  # None: float32 on CPUs, bfloat16 on GPUs
    quantize: int | None = None  # 4 or 8 bits
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise NanochatError("the source is empty: give a folder, hf:owner/name or nanochat:phase")
        step = whole("step", self.step)
        if step is not None and step < 0:
            raise NanochatError(f"step must be >= 0, got {step}")
        if isinstance(self.arch, str):  # "G6" and "6" name g6 too
            arch = self.arch.strip().lower()
            object.__setattr__(self, "arch", f"g{arch}" if arch.isdigit() else arch)
        if self.arch is not None and self.arch not in GENERATIONS:
            raise NanochatError(f"unknown architecture {self.arch!r}; known generations: {', '.join(GENERATIONS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise NanochatError(f"unknown dtype {self.dtype!r} (choose {', '.join(DTYPES)})")
        if self.quantize is not None and (whole("quantize", self.quantize) not in QUANT_BITS):
            raise NanochatError(f"unsupported quantization {self.quantize!r} (choose 4 or 8 bits)")
        if self.backend not in BACKENDS:
            raise NanochatError(f"unknown backend {self.backend!r} (choose {', '.join(BACKENDS)})")

    def with_source(self, source: str) -> LoadOptions:
        return replace(self, source=source)

    def to_dict(self) -> dict:
        return asdict(self)
