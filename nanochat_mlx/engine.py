"""The generation engine every front end shares: prefill, decode, sample, tools, stop, stats.

Backend-specific work (forward passes, caches, sampling on the device) sits behind the small
``Runner`` protocol (``backends/*/runner.py``); stop logic, the calculator tool, streaming
detokenization, statistics and prompt-cache reuse are written once here. Semantics follow the
reference's ``Engine.generate``: one prefill, ``num_samples`` rows expanded from it, the terminal
token (``<|assistant_end|>`` or ``<|bos|>``) is yielded and ends its row, forced tool-output
tokens count toward ``max_tokens``.

The stream is typed: every :class:`GenerationEvent` carries the text of each row cut into
:class:`Piece`\\ s of the reference's message parts (``text``, ``python``, ``python_output``, and
``special`` for the markers; an empty piece opens a python or output part), the tool calls
completed, the rows that stopped and why, and :class:`GenerationStats` current at that event.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .detokenizer import StreamingDetokenizer
from .errors import NanochatError
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer
from .tools import use_calculator

PREFILL_TARGET_S = 0.25  # a prefill chunk is sized to take about this long, so a stop acts quickly
PREFILL_CHUNKS = (4, 2048)  # smallest and largest chunk, in tokens (MLX on a busy CPU: ~4 tok/s)


def check_token_ids(tokens: list[int], vocab_size: int) -> None:
    """Refuse ids outside the vocabulary: an embedding lookup does not check them (MLX reads past
    the table), so they would give garbage logits, not an error."""
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise NanochatError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def piece_size(remaining: int, chunk: int) -> int:
    """The next adaptive prefill chunk: ``chunk`` tokens, or all ``remaining`` when what would be
    left is under half a chunk (a short tail costs a whole weight read of its own)."""
    return remaining if remaining - chunk < chunk // 2 else chunk


class Runner(Protocol):
    """What a backend provides to the engine. Arrays stay on the device until ``to_list``."""

    name: str  # "mlx" or "torch"
    device: str
    dtype: str
    context_limit: int  # positions the model can address
    pipelined: bool  # True when scheduling the next step before reading a token overlaps work

    def make_cache(self) -> Any: ...
    def cache_length(self, cache: Any) -> int: ...
    def prefill(self, tokens: list[int], cache: Any) -> Any:  # run a chunk; last logits (1, V)
        ...
    def decode(self, tokens: Any, cache: Any) -> Any:  # (B,) ids -> logits (B, V)
        ...
    def expand(self, cache: Any, logits: Any, n: int) -> Any:  # cache and logits for n rows
        ...
    def sampler(self, params: SamplingParams, rows: list[list[int]]) -> Sampler: ...
    def tokens(self, ids: list[int]) -> Any: ...
    def schedule(self, ids: Any) -> None:  # start computing ids without waiting
        ...
    def to_list(self, ids: Any) -> list[int]: ...
    def trim(self, cache: Any, n: int) -> bool:  # drop the last n positions, if possible
        ...
    def reset_peak_memory(self) -> None: ...
    def peak_memory(self) -> int: ...
    # What the server's batch scheduler (serve/scheduler.py) also uses: one-row caches stepped together.
    def prepare_rows(self, max_rows: int) -> dict:  # measure what batches of up to max_rows need
        ...
    def decode_rows(self, tokens: list, caches: list, lengths: list[int] | None = None) -> Any:  # (B, V)
        ...
    def clone_cache(self, cache: Any) -> Any: ...
    def cache_bytes(self, cache: Any) -> int: ...
    def prompt_logits(self, tokens: list[int], cache: Any) -> Any:  # run a chunk; every position's (T, V)
        ...


@dataclass
class ToolCall:
    """A calculator call the model made, and what was forced back into the sequence (None: refused)."""

    row: int
    expression: str
    result: str | None


@dataclass(frozen=True)
class Piece:
    """Text of one row in one message-part kind: "text", "python", "python_output" or "special"."""

    row: int
    kind: str
    text: str


@dataclass
class GenerationStats:
    """Counts and rates of one generation, current at the event that carries them."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually run (the rest came from the prompt cache)
    prefilled: int = 0  # of those, run so far
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_bytes: int = 0
    stopped: str = ""  # set at the end: "eos", "stop", "max_tokens", "context" or "cancelled"

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prefill_tokens

    def summary(self) -> str:
        reuse = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (
            f"prompt {self.prompt_tokens} tok{reuse}, {self.prefill_tps:.1f} tok/s | "
            f"generated {self.generated_tokens} tok, {self.decode_tps:.1f} tok/s | "
            f"ttft {self.ttft_s * 1000:.0f} ms | peak memory {self.peak_memory_bytes / 2**20:.1f} MiB"
        )


@dataclass
class GenerationEvent:
    """What happened since the last event.

    A decode step has one token per row (``masks`` 0 = forced by the tool); a prefill-progress
    event has none (``stats.prefilled`` grows); the last event (``final``) flushes held-back text.
    """

    stats: GenerationStats
    tokens: list[int] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finished: dict[int, str] = field(default_factory=dict)  # rows that ended here -> "eos" or "stop"
    notices: list[str] = field(default_factory=list)  # things to tell the user (a chat session's)
    final: bool = False

    def text_of(self, row: int) -> str:
        """Row ``row``'s new text as the CLI prints it (markers included)."""
        return "".join(p.text for p in self.pieces if p.row == row)

    @property
    def text(self) -> str:
        return self.text_of(0)

    @property
    def token(self) -> int:
        return self.tokens[0]


class RowState:
    """One sample's decoding state: stop tokens and strings, the calculator, streaming text.

    ``advance(token)`` applies the next token (sampled, or forced from ``forced``) and returns
    its pieces. Stop strings are matched across token boundaries on the row's ``text`` stream
    and never emitted: text that could still begin a stop string is held back until it can't.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        row: int = 0,
        stop_tokens: Iterable[int] | None = None,
        stop_strings: Iterable[str] = (),
    ) -> None:
        special = tokenizer.encode_special
        self.tokenizer, self.row = tokenizer, row
        self.stop_tokens = set(default_stop_tokens(tokenizer) if stop_tokens is None else stop_tokens)
        self.stop_strings = [s for s in stop_strings if s]
        self.python = (special("<|python_start|>"), special("<|python_end|>"))
        self.output = (special("<|output_start|>"), special("<|output_end|>"))
        self.specials = {special(t) for t in tokenizer.get_special_tokens()}
        self.finished: str | None = None  # "eos" (a stop token) or "stop" (a stop string)
        self.forced: deque[int] = deque()  # tool output to feed before sampling again
        self.kind = "text"
        self.expression: list[int] = []
        self.held = ""  # text that might begin a stop string
        self.detok = StreamingDetokenizer(tokenizer)

    def advance(self, token: int) -> tuple[list[Piece], ToolCall | None]:
        """Apply ``token``; its pieces and, when it closes a python block, the tool call."""
        if token in self.stop_tokens:
            self.finished = "eos"
            return self._text_pieces(self.detok.flush(), final=True), None
        if token in self.specials:
            pieces = self._text_pieces(self.detok.flush(), final=True)
            pieces.append(Piece(self.row, "special", self.tokenizer.decode([token])))
            was, call = self.kind, self._marker(token)
            if self.kind != was and self.kind != "text":
                pieces.append(Piece(self.row, self.kind, ""))  # an empty piece opens the part
            return pieces, call
        text = self.detok.add(token)
        if self.kind == "python":
            self.expression.append(token)
        if self.kind != "text":
            return ([Piece(self.row, self.kind, text)] if text else []), None
        return self._text_pieces(text), None

    def flush(self) -> list[Piece]:
        """The held-back end of the text (the reply is over)."""
        if self.finished == "stop":
            return []
        tail = self.detok.flush()
        return self._text_pieces(tail, final=True) if self.kind == "text" else [Piece(self.row, self.kind, tail)]

    def _marker(self, token: int) -> ToolCall | None:
        if token == self.python[0]:
            self.kind, self.expression = "python", []
        elif token == self.output[0]:
            self.kind = "python_output"
        elif token == self.output[1]:
            self.kind = "text"
        elif token == self.python[1] and self.kind == "python":
            self.kind = "text"
            expression = self.tokenizer.decode(self.expression)
            result = use_calculator(expression)
            if result is not None:
                self.forced.extend([self.output[0], *self.tokenizer.encode(result), self.output[1]])
            return ToolCall(self.row, expression, result)
        return None

    def _text_pieces(self, text: str, final: bool = False) -> list[Piece]:
        """Text of kind "text" after stop-string matching; ``final`` releases what was held."""
        if self.kind != "text":
            return [Piece(self.row, self.kind, text)] if text else []
        if not self.stop_strings:
            return [Piece(self.row, "text", text)] if text else []
        pending = self.held + text
        hits = [i for i in (pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.finished, self.held = "stop", ""
            return [Piece(self.row, "text", pending[: min(hits)])] if min(hits) else []
        keep = 0 if final else _longest_prefix_suffix(pending, self.stop_strings)
        self.held = pending[len(pending) - keep :] if keep else ""
        out = pending[: len(pending) - keep]
        return [Piece(self.row, "text", out)] if out else []


def _longest_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is the start of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def default_stop_tokens(tokenizer: Tokenizer) -> set[int]:
    """The reference's terminal tokens: ``<|assistant_end|>`` and ``<|bos|>``."""
    return {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}


class Engine:
    """Generate from a loaded model (MLX or torch) with nanochat's chat semantics."""

    def __init__(self, model: Any, tokenizer: Tokenizer, prefill_chunk: int | None = None) -> None:
        """``prefill_chunk``: a fixed prefill chunk in tokens (default: sized to ~PREFILL_TARGET_S)."""
        self.model = model
        self.tokenizer = tokenizer
        self.runner: Runner = model.make_runner()
        self.prefill_chunk = prefill_chunk
        # What the adaptive prefill has learned, kept across calls: the next chunk size, and the
        # (tokens, seconds) of the last chunk run.
        self._chunk = PREFILL_CHUNKS[0] * 4
        self._last_chunk: tuple[int, float] | None = None
        self.last_stats: GenerationStats | None = None

    @property
    def context_limit(self) -> int:
        return self.runner.context_limit

    def make_cache(self) -> Any:
        return self.runner.make_cache()

    def cache_length(self, cache: Any) -> int:
        return self.runner.cache_length(cache)

    def peak_memory(self) -> int:
        """Peak bytes the backend has held since the last generation began (process RSS on torch's CPU)."""
        return self.runner.peak_memory()

    def trim_cache(self, cache: Any, n: int) -> bool:
        """Drop the last ``n`` positions of ``cache`` if its kind allows it (False: rebuild it)."""
        return self.runner.trim(cache, n)

    def generate(
        self,
        tokens: list[int],
        params: SamplingParams | None = None,
        num_samples: int = 1,
        cache: Any = None,
        *,
        stop_tokens: Iterable[int] | None = None,
        stop_strings: Iterable[str] = (),
    ) -> Iterator[GenerationEvent]:
        """Stream a reply to ``tokens``; the last event (``final``) carries the finished stats.

        ``cache`` (one row) may already hold a prefix of ``tokens`` (a chat session's prompt
        cache): only the rest is prefilled. It is left holding everything fed to the model.
        ``stop_tokens`` default to the reference's terminal tokens (an empty set: never stop);
        ``stop_strings`` end a row where its text contains one (not emitted). Closing the
        generator stops at once, prefill included (it runs in chunks of about a quarter second).
        """
        params = params or SamplingParams()
        runner = self.runner
        if not tokens:
            raise ValueError("generate needs at least one prompt token (e.g. <|bos|>)")
        check_token_ids(tokens, self.tokenizer.vocab_size)
        if num_samples > 1 and cache is not None:
            raise ValueError("a prompt cache serves one row only")
        stop_tokens, stop_strings = list(stop_tokens) if stop_tokens is not None else None, list(stop_strings)
        limit = runner.context_limit - len(tokens)  # positions left for generated tokens
        if limit < 0:
            raise NanochatError(f"prompt of {len(tokens)} tokens exceeds the model's context of {runner.context_limit}")
        capped = params.max_tokens is None or params.max_tokens > limit
        max_tokens = limit if capped else params.max_tokens

        start = time.perf_counter()
        runner.reset_peak_memory()
        cache = runner.make_cache() if cache is None else cache
        cached = runner.cache_length(cache)
        stats = GenerationStats(prompt_tokens=len(tokens), prefill_tokens=len(tokens) - cached)
        rows = [RowState(self.tokenizer, i, stop_tokens, stop_strings) for i in range(num_samples)]
        clock = _Clock(start)
        generated = 0
        stop_reason = "context" if capped else "max_tokens"

        def snapshot() -> GenerationStats:
            clock.update(stats, generated, runner.peak_memory())
            return replace(stats)

        try:
            column = sampler = None
            if max_tokens > 0:
                logits = None
                for chunk_logits in self._prefill(tokens[cached:], cache, stats):
                    logits = chunk_logits
                    yield GenerationEvent(snapshot())
                if num_samples > 1:
                    cache, logits = runner.expand(cache, logits, num_samples)
                sampler = runner.sampler(params, [tokens] * num_samples)
                column = sampler(logits)
                runner.schedule(column)

            def step(fed: Any) -> Any:
                """Feed a column (sampled, or with forced tokens) and schedule the next one."""
                sampler.push(fed)
                following = sampler(runner.decode(fed, cache))
                runner.schedule(following)
                return following

            while generated < max_tokens:
                ahead = None
                if runner.pipelined and not any(r.forced for r in rows) and generated + 1 < max_tokens:
                    ahead = step(column)  # scheduled on the still-lazy column before reading it back
                ids = runner.to_list(column)
                clock.first_token()
                masks = [1] * num_samples
                for i, row in enumerate(rows):
                    if row.forced and not row.finished:  # the calculator's output replaces the sampled token
                        ids[i], masks[i] = row.forced.popleft(), 0
                generated += 1
                event = self._advance(rows, ids, masks)
                if all(r.finished for r in rows):
                    stop_reason = "stop" if all(r.finished == "stop" for r in rows) else "eos"
                last = stop_reason in ("eos", "stop") or generated >= max_tokens
                event.stats = snapshot()
                yield event  # before the next step runs (unless it was scheduled ahead): no added latency
                if last:
                    break
                if ahead is None:  # a forced column, or no pipelining: feed what was chosen
                    ahead = step(runner.tokens(ids) if 0 in masks else column)
                column = ahead
        except (GeneratorExit, KeyboardInterrupt):  # closed by the consumer, or Ctrl-C mid-step
            stop_reason = "cancelled"
            raise
        finally:
            stats.stopped = stop_reason
            clock.update(stats, generated, runner.peak_memory(), final=True)
            self.last_stats = stats
        tail = [piece for row in rows for piece in row.flush()]
        yield GenerationEvent(replace(stats), pieces=tail, final=True)

    def _prefill(self, tokens: list[int], cache: Any, stats: GenerationStats) -> Iterator[Any]:
        """Run the new prompt tokens in chunks sized to about PREFILL_TARGET_S; yields after each
        chunk (the last chunk's logits are for the last position)."""
        if not tokens:
            raise ValueError("the prompt cache already holds the whole prompt; trim it by one first")
        done = 0
        while done < len(tokens):
            began = time.perf_counter()
            size = self.prefill_chunk or piece_size(len(tokens) - done, self._chunk)
            piece = tokens[done : done + size]
            logits = self.runner.prefill(piece, cache)
            done += len(piece)
            stats.prefilled = done
            if self.prefill_chunk is None:
                self._chunk = self._next_chunk(len(piece), max(time.perf_counter() - began, 1e-6))
            yield logits

    def _next_chunk(self, n: int, took: float) -> int:
        """The next prefill chunk after one of ``n`` tokens took ``took`` seconds.

        A chunk costs a fixed part (every weight is read once, whatever the chunk) plus a part per
        token; two chunks of different sizes tell them apart. The chunk takes about
        PREFILL_TARGET_S, but at least long enough that the fixed part stays under a twentieth of it: on
        a large model on a slow CPU (d20 float32 reads 1.9 GB per chunk, ~0.12 s) a quarter-second
        chunk would spend half its time re-reading weights.
        """
        smallest, largest = PREFILL_CHUNKS
        previous, self._last_chunk = self._last_chunk, (n, took)
        if previous is None or previous[0] == n:  # one size seen so far: grow, to see another
            per_token, fixed = took / n, 0.0
            grow = 4 * n if took < PREFILL_TARGET_S else 0
        else:
            slope = (took - previous[1]) / (n - previous[0])
            per_token = min(max(slope, 0.1 * took / n), took / n)  # noisy timings: keep it plausible
            fixed, grow = took - per_token * n, 0
        want = max((PREFILL_TARGET_S - fixed) / per_token, 19 * fixed / per_token, grow)
        return max(smallest, min(largest, int(want)))

    def _advance(self, rows: list[RowState], ids: list[int], masks: list[int]) -> GenerationEvent:
        """Apply one column of tokens to the rows still running."""
        event = GenerationEvent(GenerationStats(), tokens=list(ids), masks=masks)
        for row, token in zip(rows, ids, strict=True):
            if row.finished:
                continue
            pieces, call = row.advance(token)
            event.pieces += pieces
            if call is not None:
                event.tool_calls.append(call)
            if row.finished:
                event.finished[row.row] = row.finished
        return event


class _Clock:
    """Time to first token and rates: prefill up to the first token read back, decode after it."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first_at: float | None = None

    def first_token(self) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()

    def update(self, stats: GenerationStats, generated: int, peak: int, final: bool = False) -> None:
        now = time.perf_counter()
        first = self.first_at or (now if final else None)
        stats.generated_tokens = generated
        stats.peak_memory_bytes = peak
        if first is None:  # still prefilling
            stats.prefill_tps = stats.prefilled / max(now - self.start, 1e-9)
            return
        stats.ttft_s = first - self.start
        stats.prefill_tps = stats.prefill_tokens / max(first - self.start, 1e-9)
        stats.decode_tps = (generated - 1) / (now - first) if generated > 1 and now > first else 0.0
