"""The server's scheduler and prompt cache, in process: tool calls, prefix reuse, eviction, and
the scheduling itself (bursts admitted together; MLX's steps scheduled ahead of reading them).

The scheduler runs its real model thread over a real engine; the tool-call tests replace only the
network by the scripted model (as the engine's tests do) so that a calculator call can be staged.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest
from conftest import variant_dir
from scripted import ScriptedModel

import nanochat_mlx as nc
from nanochat_mlx import Engine, SamplingParams
from nanochat_mlx.serve.prompt_cache import PromptCache
from nanochat_mlx.serve.scheduler import Delta, Finished, Job, Scheduler, Started

GREEDY = SamplingParams(temperature=0.0, top_k=None, max_tokens=32)


@pytest.fixture(scope="module")
def g1():
    return nc.load(str(variant_dir("g1")), backend="mlx")


def run_job(engine: Engine, tokens: list[int], params=GREEDY, **kw) -> list:
    """Every event of one job through a fresh scheduler."""
    events: queue.Queue = queue.Queue()
    scheduler = Scheduler(lambda: engine)
    scheduler.start()
    try:
        scheduler.submit(Job(tokens, params, events.put, **kw))
        out = []
        while (event := events.get(timeout=60)) is not None:
            out.append(event)
        return out
    finally:
        scheduler.stop()


class Collector:
    """A job's events as the model thread delivers them; ``done`` once the job is over."""

    def __init__(self) -> None:
        self.events: list = []
        self.delta_times: list[float] = []  # when each Delta was delivered
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if event is None:
            self.done.set()
        else:
            self.events.append(event)
            if isinstance(event, Delta):
                self.delta_times.append(time.perf_counter())

    def tokens(self) -> list[int]:
        return [t for e in self.events if isinstance(e, Delta) for t in e.tokens]


def run_together(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[Collector]:
    """Submit every job at once to one fresh scheduler; each job's events."""
    sinks = [Collector() for _ in jobs]
    scheduler = Scheduler(lambda: engine)
    scheduler.start()
    try:
        for (tokens, params), sink in zip(jobs, sinks, strict=True):
            scheduler.submit(Job(tokens, params, sink, ignore_eos=True))
        for sink in sinks:
            assert sink.done.wait(60)
        return sinks
    finally:
        scheduler.stop()


def test_a_burst_of_requests_is_admitted_before_the_batch_decodes(g1):
    engine = Engine(*g1)
    bos = engine.tokenizer.get_bos_token_id()
    jobs = [([bos, *range(100 + 7 * i, 110 + 7 * i)], GREEDY.with_(max_tokens=8)) for i in range(4)]
    sinks = run_together(engine, jobs)
    # Every job's first token came before any job's second: all were prefilled, then decoded together.
    assert max(s.delta_times[0] for s in sinks) < min(s.delta_times[1] for s in sinks)


def test_requests_arriving_while_rows_decode_are_prefilled_inside_the_decode_steps(g1, monkeypatch):
    engine = Engine(*g1)
    bos = engine.tokenizer.get_bos_token_id()
    first = ([bos, *range(60, 80)], GREEDY.with_(max_tokens=40))
    later = [([bos, *range(300 + 11 * i, 330 + 11 * i)], GREEDY.with_(max_tokens=12)) for i in range(2)]
    alone = [run_together(engine, [job])[0].tokens() for job in [first, *later]]
    prefills = []
    real_prefill = engine.runner.prefill
    monkeypatch.setattr(
        engine.runner, "prefill", lambda tokens, cache: prefills.append(len(tokens)) or real_prefill(tokens, cache)
    )
    scheduler = Scheduler(lambda: engine)
    scheduler.start()
    try:
        sinks = [Collector() for _ in range(3)]
        scheduler.submit(Job(*first, sinks[0], ignore_eos=True))
        while len(sinks[0].tokens()) < 3:
            time.sleep(0.001)
        for job, sink in zip(later, sinks[1:], strict=True):
            scheduler.submit(Job(*job, sink, ignore_eos=True))
        assert all(sink.done.wait(60) for sink in sinks)
    finally:
        scheduler.stop()
    # Only the first prompt ran alone (nothing was decoding); the later ones rode along its steps,
    # and every reply is what it is alone.
    assert prefills == [len(first[0])]
    assert [sink.tokens() for sink in sinks] == alone


@pytest.mark.parametrize("chunk", [128, 48])
def test_a_long_prompt_with_two_choices_rides_along_in_chunks_and_equals_its_solo_replies(g1, chunk):
    engine = Engine(*g1)
    bos = engine.tokenizer.get_bos_token_id()
    long_prompt = [bos, *range(50, 350)]  # chunks of up to ``chunk`` tokens, each riding a decode step
    sampled = SamplingParams(temperature=0.9, top_k=40, seed=3, max_tokens=10)
    solo, first, second = Collector(), Collector(), Collector()
    for sinks in ([solo], [first, second]):  # a fresh scheduler (and prompt cache) each time
        scheduler = Scheduler(lambda: engine, prefill_chunk=chunk)
        scheduler.start()
        try:
            if len(sinks) == 2:  # a row is decoding when the long prompt arrives
                scheduler.submit(Job([bos, *range(60, 80)], GREEDY.with_(max_tokens=60), first, ignore_eos=True))
                while len(first.tokens()) < 2:
                    time.sleep(0.001)
            scheduler.submit(Job(long_prompt, sampled, sinks[-1], n=2, ignore_eos=True))
            assert all(sink.done.wait(60) for sink in sinks)
        finally:
            scheduler.stop()

    def choices(sink: Collector) -> list[list[int]]:
        return [[t for e in sink.events if isinstance(e, Delta) and e.index == i for t in e.tokens] for i in (0, 1)]

    assert next(e for e in second.events if isinstance(e, Started)).cached_tokens == 0
    assert choices(second) == choices(solo) and all(len(c) == 10 for c in choices(solo))


def test_seeded_sampling_with_a_penalty_is_the_same_alone_and_in_a_batch(g1):
    engine = Engine(*g1)
    bos = engine.tokenizer.get_bos_token_id()
    sampled = SamplingParams(temperature=1.0, top_k=50, seed=7, repetition_penalty=1.3, max_tokens=24)
    target = ([bos, 300, 301, 302], sampled)
    others = [([bos, *range(40 + 9 * i, 52 + 9 * i)], GREEDY.with_(max_tokens=16 + 4 * i)) for i in range(3)]
    alone = run_together(engine, [target])[0].tokens()
    together = run_together(engine, [*others, target])[-1].tokens()
    assert len(alone) == 24 and together == alone


def test_a_row_cancelled_mid_stream_leaves_a_prompt_cache_entry_that_continues_correctly(g1):
    engine = Engine(*g1)
    prompt = [engine.tokenizer.get_bos_token_id(), *range(200, 220)]
    solo = run_together(engine, [(prompt, GREEDY.with_(max_tokens=24))])[0].tokens()
    scheduler = Scheduler(lambda: engine)
    scheduler.start()
    try:
        streamed = Collector()
        job = Job(prompt, GREEDY.with_(max_tokens=600), streamed, ignore_eos=True)
        scheduler.submit(job)
        while len(streamed.tokens()) < 6:
            time.sleep(0.001)
        job.cancel()
        assert streamed.done.wait(60)
        got = streamed.tokens()
        assert got == solo[: len(got)]
        resumed = Collector()
        scheduler.submit(Job(prompt + got[:4], GREEDY.with_(max_tokens=10), resumed, ignore_eos=True))
        assert resumed.done.wait(60)
    finally:
        scheduler.stop()
    started = next(e for e in resumed.events if isinstance(e, Started))
    assert started.cached_tokens > len(prompt)  # the cancelled row's cache was reused
    assert resumed.tokens() == solo[4:14]


def test_a_calculator_call_streams_the_cli_text_and_the_call(g1):
    _, tok = g1
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id()]
    script = [sp("<|python_start|>"), *tok.encode("1+2"), sp("<|python_end|>")] + [65] * 5 + [sp("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, len(prompt), tok.vocab_size), tok)
    events = run_job(engine, prompt)
    cli_text = "".join(e.text for e in engine.generate(prompt, GREEDY))
    deltas = [e for e in events if isinstance(e, Delta)]
    assert "".join(d.text for d in deltas) == cli_text
    assert [d.tool for d in deltas if d.tool] == [{"expression": "1+2", "output": "3"}]
    # The forced tool output replaces sampled tokens: the reply is as long as the script.
    assert isinstance(events[0], Started) and events[-1] == Finished(0, "stop", len(script))


def test_prompt_cache_gives_the_longest_cached_prefix_and_trims_it(g1):
    model, _ = g1
    runner = model.make_runner()
    cache = PromptCache(runner, max_bytes=1 << 30)
    first = list(range(1, 40))
    kv = runner.make_cache()
    runner.prefill(first, kv)
    cache.store(first, kv)
    hit, n = cache.fetch(first[:30] + [99, 98])  # a shared prefix of 30 tokens
    assert n == 30 and runner.cache_length(hit) == 30
    whole, n = cache.fetch(first + [5])
    assert n == len(first)
    same, n = cache.fetch(first)  # the whole prompt cached: one token is left to run
    assert n == len(first) - 1
    assert cache.fetch([7, 8, 9])[1] == 0


def test_prompt_cache_evicts_the_least_recently_used_beyond_its_bytes(g1):
    model, _ = g1
    runner = model.make_runner()
    caches = []
    for start in (1, 100, 200):
        kv = runner.make_cache()
        runner.prefill(list(range(start, start + 20)), kv)
        caches.append(kv)
    size = runner.cache_bytes(caches[0])
    cache = PromptCache(runner, max_bytes=2 * size)
    cache.store(list(range(1, 21)), caches[0])
    cache.store(list(range(100, 120)), caches[1])
    cache.fetch(list(range(1, 25)))  # touch the first: the second is now the oldest
    cache.store(list(range(200, 220)), caches[2])
    assert len(cache) == 2 and cache.bytes <= 2 * size
    assert cache.fetch(list(range(100, 125)))[1] == 0
    assert cache.fetch(list(range(1, 25)))[1] == 20
