"""Continuous batching: one model thread decodes every running request together, one token a step.

MLX arrays belong to the thread that made them, so the model is loaded, prefilled and decoded on
this one thread; the web server's event loop only submits jobs and receives their events. A job
(one request, ``n`` choices) waits in a bounded FIFO queue, is admitted when its rows fit in the
batch, is prefilled in chunks, then joins the batch as ``n`` rows; each row leaves the batch the
step it stops, and the next waiting job takes its place.
Each row keeps its own one-row cache, so rows of different lengths, sliding windows and smear
states decode in one step (``runner.decode_rows``) exactly as they would alone.

While rows are decoding, the admitted jobs' prompt chunks ride along in the decode steps (up to
``prefill_chunk`` prompt tokens a step, as extra positions of ``decode_rows``: a token budget per
step, like vLLM's ``max_num_batched_tokens`` or llama.cpp's batch size): decoding reads
every weight once a step whatever the row count, so a short prompt is prefilled nearly for free
and the running rows never stall for a separate prefill. With nothing decoding, the first job is
prefilled alone; the rest of a burst then rides along its first steps.

On a lazily evaluated backend (MLX, ``runner.pipelined``) the next decode step is scheduled on
the still-unread sampled tokens before this step's tokens are read back and streamed, as
mlx-lm's generators do: detokenizing and sending overlap the model's work instead of adding to it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine import Engine, RowState, check_token_ids
from ..errors import NanochatError
from ..sampling import Sampler, SamplingParams
from .prompt_cache import PromptCache

GREEDY = SamplingParams(temperature=0.0, top_k=None)

PREFILL_CHUNK = 128  # default prompt tokens a step runs (alone, or riding along one decode step)


class QueueFull(Exception):
    """The waiting queue is at its bound: the request is refused (HTTP 429)."""


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model and its likeliest alternatives."""

    token: int
    logprob: float | None  # None: a prompt's first token (nothing before it to predict it)
    top: list[tuple[int, float]] | None  # (token, log-probability), the likeliest first


@dataclass
class Delta:
    index: int  # the choice
    text: str
    tokens: list[int]  # the tokens this text came from (forced tool outputs included)
    tool: dict | None = None  # a calculator call: {"expression": ..., "output": ...}
    prose: str | None = None  # the text without the tool's markup, when it differs (for display)
    logprobs: list[TokenLogprob] | None = None  # when the job asked: one per output token


@dataclass
class Finished:
    index: int
    reason: str  # "stop", "length", or "abort" (cancelled: the client left or the server is stopping)
    completion_tokens: int


@dataclass
class Started:
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Scored:
    """A prompt's log-probabilities (``Job.score_prompt``): each token given those before it."""

    logprobs: list[TokenLogprob]


@dataclass
class Failed:
    message: str
    status: int = 500  # the HTTP status a request that has not answered yet gets


Event = Delta | Finished | Started | Scored | Failed


@dataclass
class Job:
    """One request: ``n`` choices of a reply to ``tokens``; events go to ``sink`` (any thread)."""

    tokens: list[int]
    params: SamplingParams
    sink: Callable[[Event | None], None]  # None: the job is over
    n: int = 1
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False  # no terminal tokens: decode params.max_tokens
    logprobs: int | None = None  # report each token's log-probability with this many alternatives
    score_prompt: bool = False  # the prompt's tokens' log-probabilities too (prefilled alone, uncached)
    cancelled: bool = False
    # Set on the model thread.
    cache: Any = None
    cached: int = 0
    prefilled: int = 0
    rows_left: int = 0

    def cancel(self) -> None:
        """Stop this job's rows at the next step (a client that went away)."""
        self.cancelled = True


@dataclass(eq=False)  # a row is itself: compared and hashed by identity
class _BatchRow:
    job: Job
    index: int
    cache: Any
    state: RowState
    sampler: Sampler | None  # None: greedy without a penalty, sampled with the whole batch at once
    max_tokens: int
    fed: list[int]  # the tokens the cache holds, in order (a step in flight: all but its input)
    generated: int = 0
    next_token: int = -1  # the token to feed next, once the step in flight (if any) is read


@dataclass
class _Step:
    """A decode step handed to the model (on MLX possibly still computing): its rows and each
    row's sampled id, not read back yet."""

    rows: list[_BatchRow]
    greedy: Any  # (B,) ids of the greedy rows' argmax, or None
    sampled: list[Any]  # per row: its own sampler's (1,) ids, or None (greedy)
    logits: Any = None  # (B, V), kept when a row's job asked for log-probabilities

    def lazy_id(self, i: int) -> Any:
        """Row i's sampled id as a device scalar (fed to the next step without reading it)."""
        return self.greedy[i] if self.sampled[i] is None else self.sampled[i][0]


class Scheduler:
    """The model thread: admission, chunked prefill, batched decode, prompt-cache bookkeeping."""

    def __init__(
        self,
        load: Callable[[], Engine],
        max_rows: int = 8,
        max_queue: int = 64,
        cache_bytes: int = 1 << 30,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        self._load = load
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.cache_bytes = cache_bytes
        self.engine: Engine | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self._waiting: deque[Job] = deque()
        self._prefilling: list[Job] = []  # admitted jobs whose prompts are being prefilled, in order
        self._rows: list[_BatchRow] = []
        self._lock = threading.Condition()
        self._stopping = False
        self.shutting_down = False  # cancel_all was called: what has not started is refused
        self.peak_rows = 0  # the most rows one decode step has run
        self.cancelled_rows = 0  # rows stopped because their client went away
        self._ahead: _Step | None = None  # a step scheduled before the last one was read back
        self._thread = threading.Thread(target=self._run, name="nanochat-model", daemon=True)
        self.prompt_cache: PromptCache | None = None

    # --- called from any thread ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        if self.engine is not None:
            check_token_ids(job.tokens, self.engine.tokenizer.vocab_size)
        with self._lock:
            self._waiting = deque(j for j in self._waiting if not j.cancelled)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(job)
            self._lock.notify()

    def cancel_all(self) -> None:
        """Stop every job, waiting or running, at the next step (the server is shutting down)."""
        with self._lock:
            self.shutting_down = True
            for job in [*self._waiting, *self._prefilling, *(r.job for r in self._rows)]:
                job.cancel()
            self._lock.notify()

    def load_stats(self) -> dict:
        """What /health reports: rows decoding, jobs waiting, prompt-cache use."""
        with self._lock:
            return {
                "running": len(self._rows),
                "peak_running": self.peak_rows,
                "cancelled": self.cancelled_rows,
                "waiting": len(self._waiting) + len(self._prefilling),
                "prompt_cache_entries": len(self.prompt_cache) if self.prompt_cache else 0,
                "prompt_cache_bytes": self.prompt_cache.bytes if self.prompt_cache else 0,
            }

    # --- the model thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._load()
            self.engine.runner.prepare_rows(self.max_rows)  # still loading: /health says 503
        except NanochatError as e:
            self.error = str(e)
            self.ready.set()
            return
        except Exception as e:  # noqa: BLE001 - reported by /health and the server's log
            self.error = f"{type(e).__name__}: {e}"
            self.ready.set()
            return
        self.prompt_cache = PromptCache(self.engine.runner, self.cache_bytes)
        self._greedy = self.engine.runner.sampler(GREEDY, [])  # stateless: any number of rows
        self.ready.set()
        while True:
            with self._lock:
                while not self._stopping and not self._rows and not self._waiting and not self._prefilling:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                if self._ahead is not None and (not self._rows or self._prefill_due()):
                    self._flush()
                self._prefill_alone()
                if self._rows:
                    self._decode_step()
            except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the server
                self._fail_all(f"{type(e).__name__}: {e}")

    def _admit(self) -> list[Job]:
        """The jobs to prefill: those under way, then waiting ones, in order, while their rows fit."""
        with self._lock:
            rows = len(self._rows) + sum(j.n for j in self._prefilling)
            while self._waiting and (self._waiting[0].cancelled or rows + self._waiting[0].n <= self.max_rows):
                job = self._waiting.popleft()
                rows += 0 if job.cancelled else job.n
                self._prefilling.append(job)
            return list(self._prefilling)

    def _prefill_alone(self) -> None:
        """With nothing decoding, prefill the first admitted job a chunk at a time until its rows run."""
        while not self._rows and (jobs := self._admit()):
            job = jobs[0]
            if self._begin(job) and not self._score(job):
                end = min(len(job.tokens), job.prefilled + self.prefill_chunk)
                logits = self.engine.runner.prefill(job.tokens[job.prefilled : end], job.cache)
                self._prefilled(job, end - job.prefilled, logits)

    def _riders(self) -> list[tuple[Job, list[int]]]:
        """The admitted jobs' next prompt chunks for one decode step, ``prefill_chunk`` tokens in all."""
        riders, budget = [], self.prefill_chunk
        for job in self._admit():
            if budget == 0:
                break
            if self._begin(job) and not self._score(job):
                chunk = job.tokens[job.prefilled : job.prefilled + budget]
                riders.append((job, chunk))
                budget -= len(chunk)
        return riders

    def _begin(self, job: Job) -> bool:
        """Before a job's first chunk: its prompt-cache prefix; False (the job dropped) if cancelled."""
        if job.cancelled:
            with self._lock:
                self._prefilling.remove(job)
            if self.shutting_down:  # its client is still there, waiting for an answer
                job.sink(Failed("the server is shutting down", 503))
            job.sink(None)
            return False
        if job.cache is None:
            # A scored prompt starts from nothing: a cached prefix comes without its logits.
            cached = (self.engine.runner.make_cache(), 0) if job.score_prompt else self.prompt_cache.fetch(job.tokens)
            job.cache, job.cached = cached
            job.prefilled = job.cached
            job.sink(Started(len(job.tokens), job.cached))
        return True

    def _score(self, job: Job) -> bool:
        """Prefill a prompt to be scored, alone and whole, keeping each token's log-probability.

        Scoring needs every position's logits, which a chunk riding along a decode step does
        not keep, so the running rows wait for it (as for a prefill before batching). False when
        ``job`` is not to be scored.
        """
        if not job.score_prompt:
            return False
        runner, tokens = self.engine.runner, job.tokens
        scored = [TokenLogprob(tokens[0], None, None)]
        for start in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[start : start + self.prefill_chunk]
            logits = runner.prompt_logits(chunk, job.cache)
            following = tokens[start + 1 : start + 1 + len(chunk)]  # what each position predicts
            if following:
                scored += self._entries(logits[: len(following)], following, job.logprobs or 0)
        job.sink(Scored(scored))
        self._prefilled(job, len(tokens), logits[-1:])
        return True

    def _entries(self, logits: Any, tokens: list[int], k: int) -> list[TokenLogprob]:
        """The log-probabilities of ``tokens``, one per row of ``logits``, and the ``k`` likeliest."""
        to_list = self.engine.runner.to_list
        chosen, values, ids = (to_list(a) for a in self._greedy.logprobs(logits, tokens, k))
        pairs = zip(tokens, chosen, ids, values, strict=True)
        return [TokenLogprob(t, c, list(zip(i, v, strict=True))) for t, c, i, v in pairs]

    def _prefilled(self, job: Job, n: int, logits: Any) -> None:
        """``n`` more prompt tokens of ``job`` have run (``logits``: the last one's); when that was
        the whole prompt, its rows join the batch with their first tokens."""
        job.prefilled += n
        if job.prefilled < len(job.tokens):
            return
        engine = self.engine
        runner = engine.runner
        with self._lock:
            self._prefilling.remove(job)
        wanted = job.params.max_tokens if job.params.max_tokens is not None else engine.context_limit
        max_tokens = min(wanted, engine.context_limit - len(job.tokens))
        if max_tokens == 0:  # a prompt scored without a reply (echo, max_tokens 0)
            for i in range(job.n):
                job.sink(Finished(i, "length", 0))
            self.prompt_cache.store(list(job.tokens), job.cache)
            job.sink(None)
            return
        caches = [job.cache] + [runner.clone_cache(job.cache) for _ in range(job.n - 1)]
        rows = []
        params = job.params
        for i, cache in enumerate(caches):
            stop_tokens = () if job.ignore_eos else None
            state = RowState(engine.tokenizer, i, stop_tokens=stop_tokens, stop_strings=job.stops)
            sampler = None
            if not params.greedy or params.repetition_penalty != 1.0:
                # Each choice draws its own stream (seed + choice), so a batch never changes a reply.
                seed = None if params.seed is None else params.seed + i
                sampler = runner.sampler(params.with_(seed=seed), [job.tokens])
            rows.append(_BatchRow(job, i, cache, state, sampler, max_tokens, list(job.tokens)))
        job.rows_left = job.n
        greedy = self._greedy(logits) if any(r.sampler is None for r in rows) else None
        greedy_id = runner.to_list(greedy)[0] if greedy is not None else None
        with self._lock:
            self._rows.extend(rows)
        for row in rows:
            token = greedy_id if row.sampler is None else runner.to_list(row.sampler(logits))[0]
            self._advance(row, token, 1, logits)

    def _decode_step(self) -> None:
        """Feed every row its last token in one batched step, sample each row, advance them.

        With a pipelined runner the following step is scheduled first, on this step's unread ids,
        unless prompt chunks ride along the next one or a tool's output must be fed instead. Rows
        certain to stop on this step (their token limit) are left out of it; a row stopped by a
        stop token still ran one step more, whose result is dropped.
        """
        for row in [r for r in self._rows if r.job.cancelled]:
            self._finish(row, None)
        step, self._ahead = self._ahead, None
        if step is None:
            if not self._rows:
                return
            step = self._dispatch(list(self._rows), None, self._riders())
        if self.engine.runner.pipelined and not self._prefill_due() and not any(r.state.forced for r in self._rows):
            running = set(self._rows)
            ahead = [r for r in step.rows if r in running and r.generated + 1 < r.max_tokens]
            joined = [r for r in self._rows if r not in set(step.rows)]  # prefilled while the step ran
            if ahead or joined:
                self._ahead = self._dispatch(ahead + joined, step)
        self._read(step)

    def _flush(self) -> None:
        """Read back the step scheduled ahead (before a step that carries prompt chunks)."""
        step, self._ahead = self._ahead, None
        if step is not None:
            self._read(step)

    def _prefill_due(self) -> bool:
        """Whether a job's prompt would ride along the next decode step (so none is scheduled ahead)."""
        with self._lock:
            head = self._waiting[0] if self._waiting else None
            return bool(self._prefilling) or (head is not None and len(self._rows) + head.n <= self.max_rows)

    def _dispatch(
        self, rows: list[_BatchRow], previous: _Step | None, riders: list[tuple[Job, list[int]]] = ()
    ) -> _Step:
        """Run one decode step of ``rows``: a row of ``previous`` is fed its id from that step
        (unread), any other row its ``next_token``; each rider's prompt chunk runs along (a job whose
        prompt that completes joins the batch). Returns the step, its rows' ids not read back."""
        runner = self.engine.runner
        index = {r: i for i, r in enumerate(previous.rows)} if previous is not None else {}
        inputs = []
        for r in rows:
            if r in index:
                inputs.append(previous.lazy_id(index[r]))
                column = previous.sampled[index[r]]  # None for a greedy row (no sampler)
            else:
                inputs.append(r.next_token)
                r.fed.append(r.next_token)
                column = runner.tokens([r.next_token]) if r.sampler is not None else None
            if r.sampler is not None:
                r.sampler.push(column)
        self.peak_rows = max(self.peak_rows, len(rows))
        caches = [r.cache for r in rows]
        if riders:
            inputs += [t for _, chunk in riders for t in chunk]
            caches += [job.cache for job, _ in riders]
        lengths = [1] * len(rows) + [len(chunk) for _, chunk in riders] if riders else None
        logits = runner.decode_rows(inputs, caches, lengths)
        for i, (job, chunk) in enumerate(riders, start=len(rows)):
            self._prefilled(job, len(chunk), logits[i : i + 1])
        logits = logits[: len(rows)]
        greedy = self._greedy(logits) if any(r.sampler is None for r in rows) else None
        sampled = [None if r.sampler is None else r.sampler(logits[i : i + 1]) for i, r in enumerate(rows)]
        for ids in [greedy, *sampled]:
            if ids is not None:
                runner.schedule(ids)
        wanted = any(r.job.logprobs is not None for r in rows)
        return _Step(rows, greedy, sampled, logits if wanted else None)

    def _read(self, step: _Step) -> None:
        """Read a step's ids back and advance its rows that are still running."""
        runner = self.engine.runner
        greedy = runner.to_list(step.greedy) if step.greedy is not None else None
        fed_ahead = set(self._ahead.rows) if self._ahead is not None else set()
        running = set(self._rows)
        for i, row in enumerate(step.rows):
            if row not in running:  # stopped, or its client went away, while this step ran
                continue
            token = greedy[i] if step.sampled[i] is None else runner.to_list(step.sampled[i])[0]
            if row in fed_ahead:  # the step scheduled ahead was fed this token
                row.fed.append(token)
            logits = step.logits[i : i + 1] if step.logits is not None else None
            if row.state.forced:  # the calculator's output replaces the sampled token
                self._advance(row, row.state.forced.popleft(), 0, logits)
            else:
                self._advance(row, token, 1, logits)

    def _advance(self, row: _BatchRow, token: int, mask: int, logits: Any = None) -> None:
        """Apply one token to a row: tool state machine, text, stop tokens and strings, limits.
        ``logits`` (1, V) are the ones it was chosen from (for the log-probabilities)."""
        pieces, call = row.state.advance(token)
        row.generated += 1
        tool = {"expression": call.expression, "output": call.result} if call is not None else None
        text = "".join(p.text for p in pieces)
        prose = "".join(p.text for p in pieces if p.kind == "text")
        logprobs = self._logprobs(row, token, logits)
        row.job.sink(Delta(row.index, text, [token], tool, prose if prose != text else None, logprobs))
        if row.state.finished:
            self._finish(row, "stop")
        elif row.generated >= row.max_tokens:
            self._finish(row, "length")
        else:
            row.next_token = token

    def _logprobs(self, row: _BatchRow, token: int, logits: Any) -> list[TokenLogprob] | None:
        """``token``'s log-probabilities when its job asked; a terminal token has none (it is no output)."""
        k = row.job.logprobs
        if k is None or logits is None or row.state.finished == "eos":
            return None
        return self._entries(logits, [token], k)

    def _finish(self, row: _BatchRow, reason: str | None) -> None:
        """Take a row out of the batch; its cache goes to the prompt cache. ``reason`` None: cancelled."""
        with self._lock:
            self._rows.remove(row)
        job = row.job
        tail = "".join(p.text for p in row.state.flush())
        if tail:
            job.sink(Delta(row.index, tail, []))
        if reason is None:
            self.cancelled_rows += 1
        # A cancelled row's client may still be there (a server stopping): it is told, with what it got.
        job.sink(Finished(row.index, reason or "abort", row.generated))
        runner = self.engine.runner
        length = runner.cache_length(row.cache)
        # A row cancelled while a step ran ahead holds one position more than the tokens read back.
        if length <= len(row.fed) or runner.trim(row.cache, length - len(row.fed)):
            self.prompt_cache.store(row.fed[: runner.cache_length(row.cache)], row.cache)
        job.rows_left -= 1
        if job.rows_left == 0:
            job.sink(None)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
            prefilling, self._prefilling = self._prefilling, []
        self._ahead = None
        jobs = {id(r.job): r.job for r in rows}
        jobs.update({id(j): j for j in prefilling})
        for j in jobs.values():
            j.sink(Failed(message))
            j.sink(None)
