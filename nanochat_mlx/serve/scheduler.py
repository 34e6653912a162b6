"""Continuous batching: one model thread decodes every running request together, one token a step.

MLX arrays belong to the thread that made them, so the model is loaded, prefilled and decoded on
this one thread; the web server's event loop only submits jobs and receives their events. A job
(one request, ``n`` choices) waits in a bounded FIFO queue, is prefilled in chunks (waiting jobs
first, for at most about half a second between two decode steps, so a long prompt never stalls
the running rows for long), then joins the batch as ``n`` rows; each row leaves the batch the
step it stops, and the next waiting job takes its place.
Each row keeps its own one-row cache, so rows of different lengths, sliding windows and smear
states decode in one step (``runner.decode_rows``) exactly as they would alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine import Engine, RowState
from ..errors import NanochatError
from ..sampling import Sampler, SamplingParams
from .prompt_cache import PromptCache

GREEDY = SamplingParams(temperature=0.0, top_k=None)

PREFILL_CHUNK = 128  # prompt tokens a prefill step runs
PREFILL_SLICE_S = 0.5  # prefill time between two decode steps while rows are decoding


class QueueFull(Exception):
    """The waiting queue is at its bound: the request is refused (HTTP 429)."""


@dataclass
class Delta:
    index: int  # the choice
    text: str
    tokens: list[int]  # the tokens this text came from (forced tool outputs included)
    tool: dict | None = None  # a calculator call: {"expression": ..., "output": ...}
    prose: str | None = None  # the text without the tool's markup, when it differs (for display)


@dataclass
class Finished:
    index: int
    reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass
class Started:
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Started | Failed


@dataclass
class Job:
    """One request: ``n`` choices of a reply to ``tokens``; events go to ``sink`` (any thread)."""

    tokens: list[int]
    params: SamplingParams
    sink: Callable[[Event | None], None]  # None: the job is over
    n: int = 1
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False  # no terminal tokens: decode params.max_tokens
    cancelled: bool = False
    # Set on the model thread.
    cache: Any = None
    cached: int = 0
    prefilled: int = 0
    rows_left: int = 0

    def cancel(self) -> None:
        """Stop this job's rows at the next step (a client that went away)."""
        self.cancelled = True


@dataclass
class _BatchRow:
    job: Job
    index: int
    cache: Any
    state: RowState
    sampler: Sampler | None  # None: greedy without a penalty, sampled with the whole batch at once
    max_tokens: int
    fed: list[int]  # the tokens the cache holds, in order
    generated: int = 0
    next_token: int = -1


class Scheduler:
    """The model thread: admission, chunked prefill, batched decode, prompt-cache bookkeeping."""

    def __init__(
        self,
        load: Callable[[], Engine],
        max_rows: int = 8,
        max_queue: int = 64,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self._load = load
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.cache_bytes = cache_bytes
        self.engine: Engine | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self._waiting: deque[Job] = deque()
        self._prefilling: Job | None = None
        self._rows: list[_BatchRow] = []
        self._lock = threading.Condition()
        self._stopping = False
        self.peak_rows = 0  # the most rows one decode step has run
        self.cancelled_rows = 0  # rows stopped because their client went away
        self._step_s = 0.0  # how long the last decode step took
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
        with self._lock:
            self._waiting = deque(j for j in self._waiting if not j.cancelled)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(job)
            self._lock.notify()

    def load_stats(self) -> dict:
        """What /health reports: rows decoding, jobs waiting, prompt-cache use."""
        with self._lock:
            return {
                "running": len(self._rows),
                "peak_running": self.peak_rows,
                "cancelled": self.cancelled_rows,
                "waiting": len(self._waiting) + (self._prefilling is not None),
                "prompt_cache_entries": len(self.prompt_cache) if self.prompt_cache else 0,
                "prompt_cache_bytes": self.prompt_cache.bytes if self.prompt_cache else 0,
            }

    # --- the model thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._load()
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
                while not self._stopping and not self._rows and not self._waiting and self._prefilling is None:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self._prefill_slice()
                if self._rows:
                    self._decode_step()
            except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the server
                self._fail_all(f"{type(e).__name__}: {e}")

    def _admit(self) -> Job | None:
        """The job to prefill: the one under way, else the first waiting one if its rows fit."""
        with self._lock:
            if self._prefilling is None and self._waiting:
                head = self._waiting[0]
                if head.cancelled or len(self._rows) + head.n <= self.max_rows:
                    self._prefilling = self._waiting.popleft()
            return self._prefilling

    def _prefill_slice(self) -> None:
        """Prefill waiting jobs, in order, between two decode steps: for PREFILL_SLICE_S, or as long
        as the last decode step took if that was longer.

        New requests get their first token soon (prefill first, as most servers schedule), while
        the running rows never wait longer than the slice and one chunk. Where a decode step of the
        whole batch is slow, prefill gets as much time as decode, not a sliver of it.
        """
        deadline = time.perf_counter() + max(PREFILL_SLICE_S, self._step_s)
        while (job := self._admit()) is not None:
            self._prefill_step(job)
            if self._rows and time.perf_counter() >= deadline:
                return

    def _prefill_step(self, job: Job) -> None:
        """One chunk of the prefilling job's prompt; when it is done, its rows join the batch."""
        engine = self.engine
        runner = engine.runner
        if job.cancelled:
            self._prefilling = None
            job.sink(None)
            return
        if job.cache is None:
            job.cache, job.cached = self.prompt_cache.fetch(job.tokens)
            job.prefilled = job.cached
            job.sink(Started(len(job.tokens), job.cached))
        end = min(len(job.tokens), job.prefilled + PREFILL_CHUNK)
        logits = runner.prefill(job.tokens[job.prefilled : end], job.cache)
        job.prefilled = end
        if end < len(job.tokens):
            return
        with self._lock:
            self._prefilling = None
        max_tokens = min(job.params.max_tokens or engine.context_limit, engine.context_limit - len(job.tokens))
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
            self._advance(row, greedy_id if row.sampler is None else runner.to_list(row.sampler(logits))[0], 1)

    def _decode_step(self) -> None:
        """Feed every row its last token in one batched step, sample each row, advance them."""
        runner = self.engine.runner
        for row in [r for r in self._rows if r.job.cancelled]:
            self._finish(row, None)
        rows = list(self._rows)
        if not rows:
            return
        self.peak_rows = max(self.peak_rows, len(rows))
        began = time.perf_counter()
        logits = runner.decode_rows([r.next_token for r in rows], [r.cache for r in rows])
        for r in rows:
            r.fed.append(r.next_token)
        greedy = runner.to_list(self._greedy(logits)) if any(r.sampler is None for r in rows) else None
        for i, row in enumerate(rows):
            token = greedy[i] if row.sampler is None else runner.to_list(row.sampler(logits[i : i + 1]))[0]
            if row.state.forced:  # the calculator's output replaces the sampled token
                self._advance(row, row.state.forced.popleft(), 0)
            else:
                self._advance(row, token, 1)
        self._step_s = time.perf_counter() - began

    def _advance(self, row: _BatchRow, token: int, mask: int) -> None:
        """Apply one token to a row: tool state machine, text, stop tokens and strings, limits."""
        pieces, call = row.state.advance(token)
        row.generated += 1
        tool = {"expression": call.expression, "output": call.result} if call is not None else None
        text = "".join(p.text for p in pieces)
        prose = "".join(p.text for p in pieces if p.kind == "text")
        row.job.sink(Delta(row.index, text, [token], tool, prose if prose != text else None))
        if row.state.finished:
            self._finish(row, "stop")
        elif row.generated >= row.max_tokens:
            self._finish(row, "length")
        else:
            row.next_token = token
            if row.sampler is not None:
                row.sampler.push(self.engine.runner.tokens([token]))

    def _finish(self, row: _BatchRow, reason: str | None) -> None:
        """Take a row out of the batch; its cache goes to the prompt cache. ``reason`` None: cancelled."""
        with self._lock:
            self._rows.remove(row)
        job = row.job
        if reason is not None:
            tail = "".join(p.text for p in row.state.flush())
            if tail:
                job.sink(Delta(row.index, tail, []))
            job.sink(Finished(row.index, reason, row.generated))
        else:
            self.cancelled_rows += 1
        length = self.engine.runner.cache_length(row.cache)
        self.prompt_cache.store(row.fed[:length], row.cache)
        job.rows_left -= 1
        if job.rows_left == 0:
            job.sink(None)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
            job, self._prefilling = self._prefilling, None
        jobs = {id(r.job): r.job for r in rows}
        if job is not None:
            jobs[id(job)] = job
        for j in jobs.values():
            j.sink(Failed(message))
            j.sink(None)
