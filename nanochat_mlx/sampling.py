"""The sampling policy, written once: both backends execute it through a few array primitives.

A backend provides :class:`ArrayOps` (about ten primitives over its arrays); :class:`Sampler`
composes them into the policy: repetition penalty over the last ``REPETITION_WINDOW`` tokens
(mlx-lm's logits processor), then greedy (the reference's first maximum) or temperature with
top-k, min-p and top-p filters. The token history stays on the device, so a pipelined decode
loop never waits for a token to be read back, penalty or not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from .errors import NanochatError
from .options import finite, whole

REPETITION_WINDOW = 20  # tokens the repetition penalty looks back over (mlx-lm's default)
MAX_TOP_LOGPROBS = 20  # alternatives a token's log-probabilities may list (OpenAI's bound)
MAX_SEED = 2**63 - 1  # what every backend's generator takes
SMALLEST_TEMPERATURE = 1.1754944e-38  # float32's smallest normal: 0 / it stays 0 (a smaller one would round to 0)


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
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            set_(name, finite(name.replace("_", " "), getattr(self, name)))
        for name in ("top_k", "seed", "max_tokens"):
            whole(name.replace("_", " "), getattr(self, name))
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
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise NanochatError(f"seed must be between 0 and 2**63-1, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> SamplingParams:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


class ArrayOps(Protocol):
    """The primitives a backend gives the policy. Arrays are (B, V) logits or (B, W) token ids."""

    def ids(self, rows: list[list[int]]) -> Any: ...  # int ids (B, W) on the device
    def push(self, history: Any, column: Any) -> Any: ...  # drop the oldest id of each row, append column (B,)
    def gather(self, logits: Any, ids: Any) -> Any: ...  # logits[b, ids[b, j]] -> (B, W)
    def scatter(self, logits: Any, ids: Any, values: Any) -> Any: ...  # a copy with those entries set
    def where(self, condition: Any, a: Any, b: Any) -> Any: ...  # b may be a scalar
    def argmax(self, logits: Any) -> Any: ...  # (B,), the first maximum
    def kth_largest(self, logits: Any, k: int) -> Any: ...  # (B, 1)
    def softmax(self, logits: Any) -> Any: ...
    def log_softmax(self, logits: Any) -> Any: ...  # in float32
    def row_max(self, x: Any) -> Any: ...  # (B, 1)
    def sort_descending(self, x: Any) -> tuple[Any, Any]: ...  # values, indices
    def top(self, x: Any, k: int) -> tuple[Any, Any]: ...  # the k largest (k >= 1), largest first: values, ids
    def cumsum(self, x: Any) -> Any: ...
    def unsort(self, sorted_values: Any, order: Any) -> Any: ...  # inverse of take_along(x, order)
    def categorical(self, logits: Any, rng: Any) -> Any: ...  # (B,) samples of softmax(logits)
    def rng(self, seed: int | None) -> Any: ...  # a generator state for ``categorical``


class Sampler:
    """The policy for one generation: ``sampler(logits) -> ids`` and ``sampler.push(column)``.

    ``rows`` are each row's tokens so far (the prompt); the history the penalty reads is kept
    on the device as the last ``REPETITION_WINDOW`` ids of each row. Rows shorter than the window
    are padded by repeating their first id: a repeated id is penalized once, like any other.
    """

    def __init__(self, ops: ArrayOps, params: SamplingParams, rows: list[list[int]]) -> None:
        self.ops, self.params = ops, params
        self.rng = ops.rng(params.seed) if not params.greedy else None
        self.history = None
        if params.repetition_penalty != 1.0:
            window = [r[-REPETITION_WINDOW:] for r in rows]
            self.history = ops.ids([[r[0]] * (REPETITION_WINDOW - len(r)) + r for r in window])

    def push(self, column: Any) -> None:
        """Record the ids fed to the model next (sampled or forced by a tool)."""
        if self.history is not None:
            self.history = self.ops.push(self.history, column)

    def logprobs(self, logits: Any, tokens: list[int], k: int) -> tuple[Any, Any, Any]:
        """The model's log-probabilities of ``tokens`` (one per row of ``logits``) and its ``k`` likeliest.

        They come from the raw logits (before the repetition penalty, temperature and filters, as
        mlx-lm's and vLLM's servers report them): what the model thinks, whatever the sampling.
        Returns device arrays: the chosen tokens' (B,), the top values (B, k) and their ids (B, k).
        """
        logprobs = self.ops.log_softmax(logits)
        chosen = self.ops.gather(logprobs, self.ops.ids([[t] for t in tokens]))[:, 0]
        values, ids = self.ops.top(logprobs, k) if k else (logprobs[:, :0], logprobs[:, :0])
        return chosen, values, ids

    def __call__(self, logits: Any) -> Any:
        ops, p = self.ops, self.params
        if self.history is not None:
            picked = ops.gather(logits, self.history)
            penalized = ops.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
            logits = ops.scatter(logits, self.history, penalized)
        if p.greedy:
            return ops.argmax(logits)
        # Scaled from the row's maximum, which stays 0: a temperature so small that the others
        # overflow to -inf then samples the maximum, never inf/inf (NaN) or a tie of infinities.
        logits = (logits - ops.row_max(logits)) / max(p.temperature, SMALLEST_TEMPERATURE)
        if p.top_k and p.top_k < logits.shape[-1]:
            logits = ops.where(logits < ops.kth_largest(logits, p.top_k), -float("inf"), logits)
        if p.min_p > 0 or p.top_p < 1.0:
            probs = ops.softmax(logits)
            if p.min_p > 0:
                logits = ops.where(probs < p.min_p * ops.row_max(probs), -float("inf"), logits)
            if p.top_p < 1.0:
                # Keep the smallest prefix (by probability) whose mass reaches top_p; the first stays.
                sorted_probs, order = ops.sort_descending(probs)
                drop = (ops.cumsum(sorted_probs) - sorted_probs) >= p.top_p
                logits = ops.where(ops.unsort(drop, order), -float("inf"), logits)
        return ops.categorical(logits, self.rng)
