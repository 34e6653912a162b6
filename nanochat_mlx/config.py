"""Model geometry (from meta/config files) and the per-generation architecture spec.

Everything that distinguishes nanochat's architecture generations g1..g9 lives in one
``ArchSpec`` per generation (see shared docs, nanochat-reference.md §1-2). The model and the
torch backend read flags and constants from the spec; they never test generation names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import CheckpointError, NanochatError

# The reference calls F.rms_norm(x, ...) with eps=None, i.e. torch.finfo(float32).eps.
RMS_EPS = 1.1920928955078125e-07


def _half(seq_len: int) -> int:
    return seq_len // 2


def _ceil_third_to_128(seq_len: int) -> int:
    return -(-seq_len // 384) * 128


def _ceil_quarter_to_128(seq_len: int) -> int:
    return -(-seq_len // 512) * 128


@dataclass(frozen=True)
class ArchSpec:
    """What one generation of the reference computes beyond the shared GPT core."""

    name: str
    summary: str
    rope_base: float = 10000.0
    rope_table_bf16: bool = True  # g1-g6 round cos/sin to bfloat16 even in float32 runs
    softcap: float = 15.0
    qk_scale: float = 1.0  # q and k multiplied by this after QK-norm (g8, g9)
    lambdas: bool = False  # per-layer resid_lambdas / x0_lambdas (g3+)
    short_window: Callable[[int], int] | None = field(default=None, repr=False)  # g4+
    value_embeds: bool = False  # value embeddings on alternating layers (g5+)
    ve_gate_channels: int = 32
    ve_gate_scale: float = 2.0
    smear: bool = False  # g9: mix the previous token's embedding into the current one
    smear_channels: int = 24
    backout: bool = False  # g9: subtract the mid-network residual before the final norm

    @property
    def windowed(self) -> bool:
        return self.short_window is not None


_G5 = dict(
    lambdas=True,
    short_window=_half,
    value_embeds=True,
)

GENERATIONS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("g1", "initial GPT: rotary, QK-norm, relu^2, GQA, softcap 15"),
        ArchSpec("g2", "g1 with wte/lm_head rows padded to a multiple of 64"),
        ArchSpec("g3", "g2 + resid_lambdas / x0_lambdas", lambdas=True),
        ArchSpec("g4", "g3 + sliding windows (short = S//2)", lambdas=True, short_window=_half),
        ArchSpec("g5", "g4 + value embeddings (gate 2*sigmoid over 32 channels)", **_G5),
        ArchSpec("g6", "g5 with softcap 20", softcap=20.0, **_G5),
        ArchSpec("g7", "g6 with float32 rotary tables", softcap=20.0, rope_table_bf16=False, **_G5),
        ArchSpec(
            "g8",
            "rope base 100000, q/k x1.15, VE gate 3*sigmoid over 12 channels, short = ceil(S/384)*128",
            rope_base=100000.0,
            rope_table_bf16=False,
            qk_scale=1.15,
            lambdas=True,
            short_window=_ceil_third_to_128,
            value_embeds=True,
            ve_gate_channels=12,
            ve_gate_scale=3.0,
        ),
        ArchSpec(
            "g9",
            "g8 + smear and backout, q/k x1.2, short = ceil(S/512)*128",
            rope_base=100000.0,
            rope_table_bf16=False,
            qk_scale=1.2,
            lambdas=True,
            short_window=_ceil_quarter_to_128,
            value_embeds=True,
            ve_gate_channels=12,
            ve_gate_scale=3.0,
            smear=True,
            backout=True,
        ),
    )
}


def get_spec(name: str) -> ArchSpec:
    """The spec of generation ``name`` ("g1".."g9")."""
    try:
        return GENERATIONS[name.lower()]
    except KeyError:
        known = ", ".join(GENERATIONS)
        raise CheckpointError(f"unknown architecture {name!r}; known generations: {known}") from None


@dataclass(frozen=True)
class ModelConfig:
    """The geometry recorded in a checkpoint's meta ``model_config`` (plus the padded vocab)."""

    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str = "L"
    padded_vocab_size: int = 0  # rows of wte/lm_head; 0 means "same as vocab_size"

    def __post_init__(self) -> None:
        if self.padded_vocab_size == 0:
            object.__setattr__(self, "padded_vocab_size", self.vocab_size)
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise CheckpointError(
                f"inconsistent model_config: n_embd={self.n_embd}, n_head={self.n_head}, "
                f"n_kv_head={self.n_kv_head} (n_embd must divide by n_head, n_head by n_kv_head)"
            )
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - {"S", "L"}:
            raise CheckpointError(f"window_pattern {self.window_pattern!r} may only hold S and L")
        object.__setattr__(self, "window_pattern", pattern)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rope_len(self) -> int:
        """Positions covered by the reference's rotary table: the hard context limit."""
        return 10 * self.sequence_len

    @property
    def context_limit(self) -> int:
        """Positions a forward pass may address (the rotary table's length)."""
        return self.rope_len

    def check_context(self, length: int) -> None:
        """Refuse a forward pass that would reach past the context limit."""
        if length > self.context_limit:
            raise NanochatError(
                f"context of {length} tokens exceeds the model's limit of {self.context_limit} "
                f"(10 x sequence_len {self.sequence_len})"
            )

    def window_sizes(self, spec: ArchSpec) -> list[int | None]:
        """Per-layer window w (query i sees keys i-w..i), or None for full causal attention."""
        if spec.short_window is None:
            return [None] * self.n_layer
        short = spec.short_window(self.sequence_len)
        sizes = [
            short if self.window_pattern[i % len(self.window_pattern)] == "S" else self.sequence_len
            for i in range(self.n_layer)
        ]
        sizes[-1] = self.sequence_len  # the last layer is always long
        return sizes

    def ve_layers(self, spec: ArchSpec) -> list[int]:
        """Layers with a value embedding: alternating, the last layer always included."""
        if not spec.value_embeds:
            return []
        return [i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2]

    # Roofline accounting: the bytes a decoded token must read from memory (the reference keeps the
    # same accounting on its GPT: kv_bytes_per_token, kv_read_bytes).
    def weight_bytes(self, spec: ArchSpec, itemsize: int = 4) -> int:
        """Bytes of every parameter, held at ``itemsize`` bytes per element."""
        from .weights import expected_shapes  # weights.py builds on this module

        return itemsize * sum(math.prod(shape) for shape in expected_shapes(self, spec).values())

    def decode_weight_bytes(self, spec: ArchSpec, itemsize: int = 4) -> int:
        """Weight bytes one decoded token reads: every matrix and scalar, but only the token's row
        of the embedding tables (``wte`` and the value embeddings are gathers)."""
        from .weights import expected_shapes

        elements = 0
        for name, shape in expected_shapes(self, spec).items():
            gathered = name == "transformer.wte.weight" or name.startswith("value_embeds.")
            elements += shape[-1] if gathered else math.prod(shape)
        return itemsize * elements

    def kv_read_bytes(self, spec: ArchSpec, context: int, itemsize: int = 4) -> int:
        """KV-cache bytes one decode step reads at ``context`` cached positions, all layers
        (a layer with window w reads at most w + 1 positions)."""
        per_position = 2 * self.n_kv_head * self.head_dim * itemsize
        return per_position * sum(min(context, context if w is None else w + 1) for w in self.window_sizes(spec))

    def to_dict(self) -> dict[str, int | str]:
        return {
            "sequence_len": self.sequence_len,
            "vocab_size": self.vocab_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_kv_head": self.n_kv_head,
            "n_embd": self.n_embd,
            "window_pattern": self.window_pattern,
            "padded_vocab_size": self.padded_vocab_size,
        }
