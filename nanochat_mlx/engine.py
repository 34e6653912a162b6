"""The generation engine every front end shares: prefill, decode, sample, tools, stop, stats.

Backend-specific work (forward passes, caches, sampling on the device) sits behind the small
``Runner`` protocol (``backends/``); stop logic, the calculator tool, streaming detokenization,
statistics and prompt-cache reuse are written once here. Semantics follow the reference's
``Engine.generate``: one prefill, ``num_samples`` rows expanded from it, the terminal token
(``<|assistant_end|>`` or ``<|bos|>``) is yielded and ends its row, forced tool-output tokens
count toward ``max_tokens``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .detokenizer import StreamingDetokenizer
from .errors import NanochatError
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .tools import use_calculator


class Runner(Protocol):
    """What a backend provides to the engine. Arrays stay on the device until ``to_list``."""

    name: str  # "mlx" or "torch"
    device: str
    dtype: str
    context_limit: int  # positions the model can address

    def make_cache(self) -> Any: ...
    def cache_length(self, cache: Any) -> int: ...
    def prefill(self, tokens: list[int], cache: Any) -> Any:  # run a chunk; last logits (1, V)
        ...
    def decode(self, tokens: Any, cache: Any) -> Any:  # (B,) ids -> logits (B, V)
        ...
    def expand(self, cache: Any, logits: Any, n: int) -> Any:  # cache and logits for n rows
        ...
    def sampler(self, params: SamplingParams) -> Any:  # (logits, histories) -> ids (B,), lazy
        ...
    def tokens(self, ids: list[int]) -> Any: ...
    def schedule(self, ids: Any) -> None:  # start computing ids without waiting
        ...
    def to_list(self, ids: Any) -> list[int]: ...
    def trim(self, cache: Any, n: int) -> bool:  # drop the last n positions, if possible
        ...
    def reset_peak_memory(self) -> None: ...
    def peak_memory(self) -> int: ...


@dataclass
class ToolCall:
    """A calculator call the model made, and what was forced back into the sequence."""

    row: int
    expression: str
    result: str | None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually run (the rest came from the prompt cache)
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_bytes: int = 0
    stopped: str = ""  # "eos", "max_tokens", "cancelled" or "context"

    def summary(self) -> str:
        cached = self.prompt_tokens - self.prefill_tokens
        reuse = f" ({cached} cached)" if cached else ""
        return (
            f"prompt {self.prompt_tokens} tok{reuse}, {self.prefill_tps:.1f} tok/s | "
            f"generated {self.generated_tokens} tok, {self.decode_tps:.1f} tok/s | "
            f"ttft {self.ttft_s * 1000:.0f} ms | peak memory {self.peak_memory_bytes / 2**20:.1f} MiB"
        )


@dataclass
class GenerationEvent:
    """One decoding step: a token per row (``masks`` 0 = forced by the tool), text deltas."""

    tokens: list[int]
    masks: list[int]
    texts: list[str]
    tool_calls: list[ToolCall] = field(default_factory=list)
    stats: GenerationStats | None = None  # set on the final event only

    @property
    def token(self) -> int:
        return self.tokens[0]

    @property
    def text(self) -> str:
        return self.texts[0]


class _Row:
    """Per-sample state: completion, the calculator state machine, detokenization."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.completed = False
        self.in_python = False
        self.expression: list[int] = []
        self.forced: deque[int] = deque()
        self.history: list[int] = []
        self.detok = StreamingDetokenizer(tokenizer)


class Engine:
    """Generate from a loaded model (MLX or torch) with nanochat's chat semantics."""

    def __init__(self, model: Any, tokenizer: Tokenizer, prefill_chunk: int = 512) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.runner: Runner = model.make_runner()
        self.prefill_chunk = prefill_chunk
        self.last_stats: GenerationStats | None = None
        special = tokenizer.encode_special
        self.stop_ids = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self._python_start = special("<|python_start|>")
        self._python_end = special("<|python_end|>")
        self._output = (special("<|output_start|>"), special("<|output_end|>"))

    @property
    def context_limit(self) -> int:
        return self.runner.context_limit

    def make_cache(self) -> Any:
        return self.runner.make_cache()

    def generate(
        self,
        tokens: list[int],
        params: SamplingParams | None = None,
        num_samples: int = 1,
        cache: Any = None,
    ) -> Iterator[GenerationEvent]:
        """Stream a reply to ``tokens``; the last event carries the stats.

        ``cache`` (one row) may already hold a prefix of ``tokens`` (a chat session's prompt
        cache): only the rest is prefilled. It is left holding everything fed to the model.
        Closing the generator early stops decoding at once.
        """
        params = params or SamplingParams()
        runner = self.runner
        if not tokens:
            raise ValueError("generate needs at least one prompt token (e.g. <|bos|>)")
        if num_samples > 1 and cache is not None:
            raise ValueError("a prompt cache serves one row only")
        start = time.perf_counter()
        runner.reset_peak_memory()
        cache = runner.make_cache() if cache is None else cache
        cached = runner.cache_length(cache)
        stats = GenerationStats(prompt_tokens=len(tokens), prefill_tokens=len(tokens) - cached)
        sample = runner.sampler(params)
        rows = [_Row(self.tokenizer) for _ in range(num_samples)]
        for row in rows:
            row.history = list(tokens)
        limit = runner.context_limit - len(tokens)  # positions left for generated tokens
        if limit < 0:
            raise NanochatError(f"prompt of {len(tokens)} tokens exceeds the model's context of {runner.context_limit}")
        capped = params.max_tokens is None or params.max_tokens > limit
        max_tokens = limit if capped else params.max_tokens

        column = None
        if max_tokens > 0:
            logits = self._prefill(tokens[cached:], cache)
            if num_samples > 1:
                cache, logits = runner.expand(cache, logits, num_samples)
            column = sample(logits, [r.history for r in rows])
            runner.schedule(column)
        # The repetition penalty reads each row's history, which pipelining has not read back yet.
        pipelined = params.repetition_penalty == 1.0
        generated = 0
        first_at = None
        stop_reason = "context" if capped else "max_tokens"
        try:
            while generated < max_tokens:
                ahead = None
                if pipelined and not any(r.forced for r in rows) and generated + 1 < max_tokens:
                    # Schedule the next step on the still-lazy column before reading it back.
                    ahead = sample(runner.decode(column, cache), None)
                    runner.schedule(ahead)
                ids = runner.to_list(column)
                first_at = first_at or time.perf_counter()
                masks = [1] * num_samples
                for i, row in enumerate(rows):
                    if row.forced:  # the calculator's output replaces the sampled token
                        ids[i], masks[i] = row.forced.popleft(), 0
                generated += 1
                event = self._advance(rows, ids, masks)
                if all(r.completed for r in rows):
                    stop_reason = "eos"
                if stop_reason == "eos" or generated >= max_tokens:
                    yield event
                    break
                if ahead is None:  # a forced column (or a history-aware sampler): feed what was chosen
                    ahead = sample(runner.decode(runner.tokens(ids), cache), [r.history for r in rows])
                    runner.schedule(ahead)
                column = ahead
                yield event
        except (GeneratorExit, KeyboardInterrupt):  # closed by the consumer, or Ctrl-C mid-step
            stop_reason = "cancelled"
            raise
        finally:
            now = time.perf_counter()
            first_at = first_at or now
            stats.generated_tokens = generated
            stats.ttft_s = first_at - start
            stats.prefill_tps = stats.prefill_tokens / max(first_at - start, 1e-9)
            stats.decode_tps = (generated - 1) / (now - first_at) if generated > 1 and now > first_at else 0.0
            stats.peak_memory_bytes = runner.peak_memory()
            stats.stopped = stop_reason
            self.last_stats = stats
        tail = [r.detok.flush() for r in rows]
        yield GenerationEvent(tokens=[], masks=[], texts=tail, stats=stats)

    def _prefill(self, tokens: list[int], cache: Any) -> Any:
        """Run the new prompt tokens in chunks; logits of the last position."""
        if not tokens:
            raise ValueError("the prompt cache already holds the whole prompt; trim it by one first")
        chunk = self.prefill_chunk
        logits = None
        for i in range(0, len(tokens), chunk):
            logits = self.runner.prefill(tokens[i : i + chunk], cache)
        return logits

    def _advance(self, rows: list[_Row], ids: list[int], masks: list[int]) -> GenerationEvent:
        """Apply one column of tokens to each row: stop, tool state machine, text."""
        texts, calls = [], []
        for i, (row, token) in enumerate(zip(rows, ids, strict=True)):
            row.history.append(token)
            if token in self.stop_ids:
                row.completed = True
                texts.append("")
            else:
                texts.append(row.detok.add(token))
            if token == self._python_start:
                row.in_python, row.expression = True, []
            elif token == self._python_end and row.in_python:
                row.in_python = False
                expression = self.tokenizer.decode(row.expression)
                result = use_calculator(expression)
                if result is not None:
                    row.forced.extend([self._output[0], *self.tokenizer.encode(result), self._output[1]])
                calls.append(ToolCall(i, expression, result))
            elif row.in_python:
                row.expression.append(token)
        return GenerationEvent(tokens=list(ids), masks=masks, texts=texts, tool_calls=calls)
