"""ChatSession: multi-turn chat over the engine with a prompt cache that survives turns."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ids_for, to_numpy, variant_dir

import nanochat_mlx as nc
from nanochat_mlx import ChatSession, Engine, SamplingParams, Turn

GREEDY = SamplingParams(temperature=0.0, top_k=None, max_tokens=12)


@pytest.fixture(scope="module", params=["g1", "g4", "g9"])
def loaded(request, backend):
    return nc.load(str(variant_dir(request.param)), backend=backend)


def session(loaded, **kw) -> ChatSession:
    model, tok = loaded
    return ChatSession(Engine(model, tok), params=kw.pop("params", GREEDY), **kw)


def test_first_turn_renders_like_the_reference(loaded):
    s = session(loaded)
    tok = s.tokenizer
    list(s.send("Write one sentence about the sea."))
    conversation = {
        "messages": [
            {"role": "user", "content": "Write one sentence about the sea."},
            {"role": "assistant", "content": ""},
        ]
    }
    assert s.prompt_tokens() == tok.render_for_completion(conversation)


def test_system_prompt_is_merged_into_the_first_user_message(loaded):
    s = session(loaded, system_prompt="Be brief.")
    list(s.send("Hi"))
    conversation = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": ""}]}
    assert s.prompt_tokens() == s.tokenizer.render_for_completion(conversation)


def test_later_turns_prefill_only_their_new_tokens(loaded):
    s = session(loaded)
    list(s.send("one"))
    before = len(s.prompt_tokens()) + len(s.turns[-1].reply_tokens)
    list(s.send("two"))
    stats = s.last_stats
    assert stats.prompt_tokens - stats.prefill_tokens >= before - 1
    assert stats.prefill_tokens <= len(s.tokenizer.encode("two")) + 5


def test_cached_turn_equals_a_cold_run(loaded):
    warm = session(loaded)
    for text in ("first message", "second", "third one"):
        list(warm.send(text))
    cold = session(loaded)
    cold.turns = [Turn(t.user, [dict(p) for p in t.parts], list(t.reply_tokens)) for t in warm.turns[:-1]]
    list(cold.send("third one"))
    assert cold.last_stats.prefill_tokens == cold.last_stats.prompt_tokens
    assert cold.turns[-1].reply_tokens == warm.turns[-1].reply_tokens


def test_cached_logits_equal_cold_logits(loaded):
    model, _ = loaded
    s = session(loaded)
    list(s.send("first message"))
    list(s.send("and a second"))
    tokens = s.prompt_tokens() + s.turns[-1].reply_tokens
    cache, cached = s._cache, s._cached
    assert cached == tokens[: len(cached)]
    probe = tokens[len(cached) :] or [65]
    warm = to_numpy(model(ids_for(model, [probe]), cache=cache)[0, -1])
    cold = to_numpy(model(ids_for(model, [cached + probe]))[0, -1])
    assert np.abs(warm - cold).max() < 1e-4


def test_undo_removes_the_last_turn_and_the_next_reply_matches(loaded):
    s = session(loaded)
    list(s.send("hello"))
    first = list(s.turns[0].reply_tokens)
    list(s.send("something else"))
    assert s.undo().user == "something else"
    s.undo()
    list(s.send("hello"))
    assert s.turns[0].reply_tokens == first


def test_regenerate_replaces_the_last_reply(loaded):
    s = session(loaded, params=GREEDY.with_(temperature=1.0, seed=1))
    list(s.send("hello"))
    s.params = s.params.with_(seed=2)
    events = list(s.regenerate())
    assert len(s.turns) == 1
    assert s.turns[0].reply_tokens == [e.token for e in events if e.tokens]


def test_clear_starts_over(loaded):
    s = session(loaded)
    list(s.send("hello"))
    s.clear()
    assert s.turns == [] and s.context_used() == 1
    list(s.send("hello"))
    assert len(s.turns) == 1


def test_cancelled_reply_is_kept_and_marked_stopped(loaded):
    s = session(loaded)
    stream = s.stream("hello")
    decoded = 0
    while decoded < 2:
        decoded += bool(next(stream).tokens)
    stream.close()
    assert s.turns[-1].stopped and len(s.turns[-1].reply_tokens) == 2
    list(s.send("next"))
    assert len(s.turns) == 2 and not s.turns[-1].stopped


def test_an_overflowing_conversation_feeds_the_model_only_its_latest_turns(loaded):
    s = session(loaded, params=GREEDY.with_(max_tokens=40))
    limit = s.engine.context_limit
    long_text = "lorem ipsum dolor sit amet " * (limit // 40)
    notices, starts = [], []
    for _ in range(6):
        for event in s.stream(long_text):
            notices += event.notices
        assert len(s.prompt_tokens()) + len(s.turns[-1].reply_tokens) <= limit
        starts.append(s.context_start)
    assert len(s.turns) == 6  # the transcript keeps every turn
    assert starts[-1] > 0
    moves = sum(1 for a, b in zip([0, *starts], starts, strict=False) if b > a)
    assert len(notices) == moves and all("no longer sees" in n for n in notices)  # one notice per move


def test_a_message_longer_than_the_context_is_refused(loaded):
    s = session(loaded)
    with pytest.raises(nc.NanochatError, match="too long"):
        list(s.send("word " * (s.engine.context_limit * 2)))
    assert s.turns == []


def test_turns_round_trip_through_dicts(loaded):
    s = session(loaded)
    list(s.send("hello"))
    data = [t.to_dict() for t in s.turns]
    assert [Turn.from_dict(d).to_dict() for d in data] == data
