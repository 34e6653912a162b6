"""The engine's behaviour: reference greedy decoding, stops, limits, seeds, tools, streaming."""

from __future__ import annotations

import pytest
from conftest import expected_json, run_generation, variant_arch, variant_dir
from scripted import ScriptedModel

import nanochat_mlx as nc
from nanochat_mlx import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0.0, top_k=None, max_tokens=32)


@pytest.fixture(scope="module")
def g9():
    """The g9 fixture on MLX (its tokenizer also drives the scripted model)."""
    return nc.load(str(variant_dir("g9")), backend="mlx")


@pytest.fixture(scope="module")
def g9_on(backend):
    """The g9 fixture on each backend."""
    return nc.load(str(variant_dir("g9")), backend=backend)


run = run_generation


@pytest.mark.parametrize("variant", ["g1", "g4", "g5", "g7", "g8", "g9"])
def test_greedy_generation_matches_reference_engine(variant, backend):
    model, tok = nc.load(str(variant_dir(variant)), arch=variant_arch(variant), backend=backend)
    engine = Engine(model, tok)
    for case in expected_json(variant, "generate.json")["cases"]:
        params = GREEDY.with_(max_tokens=case["max_tokens"])
        columns, masks, _, _ = run(engine, case["prompt_ids"], params, num_samples=case["num_samples"])
        assert columns == case["token_columns"], case["name"]
        assert masks == case["token_masks"], case["name"]


def test_streamed_text_is_decode_of_tokens(g9_on):
    model, tok = g9_on
    case = next(c for c in expected_json("g9", "generate.json")["cases"] if c["name"] == "p2_code_unicode")
    columns, _, text, _ = run(Engine(model, tok), case["prompt_ids"], GREEDY)
    assert text == tok.decode([c[0] for c in columns])


def test_an_adaptive_prefill_chunk_takes_a_short_tail_along() -> None:
    from nanochat_mlx.engine import piece_size

    assert piece_size(512, 400) == 512  # 112 left would be under half a chunk: one pass
    assert piece_size(600, 400) == 400 and piece_size(300, 400) == 300


def test_chunked_prefill_gives_the_same_tokens(g9_on):
    model, tok = g9_on
    case = next(c for c in expected_json("g9", "generate.json")["cases"] if c["name"] == "p3_long")
    columns, _, _, stats = run(Engine(model, tok, prefill_chunk=16), case["prompt_ids"], GREEDY)
    assert columns == case["token_columns"]
    assert stats.prefill_tokens == len(case["prompt_ids"])


def test_max_tokens_limits_the_reply(g9_on):
    model, tok = g9_on
    columns, _, _, stats = run(Engine(model, tok), [tok.get_bos_token_id()], GREEDY.with_(max_tokens=5))
    assert len(columns) == 5
    assert stats.generated_tokens == 5 and stats.stopped == "max_tokens"


def test_zero_max_tokens_generates_nothing(g9_on):
    model, tok = g9_on
    columns, _, text, stats = run(Engine(model, tok), [tok.get_bos_token_id()], GREEDY.with_(max_tokens=0))
    assert columns == [] and text == "" and stats.generated_tokens == 0


def test_generation_stops_at_the_context_limit(g9_on):
    model, tok = g9_on
    limit = model.config.context_limit
    prompt = [tok.get_bos_token_id()] + [65] * (limit - 6)
    columns, _, _, stats = run(Engine(model, tok), prompt, GREEDY.with_(max_tokens=None))
    assert len(columns) == 5
    assert stats.stopped == "context"


def test_same_seed_same_tokens_and_other_seed_differs(g9_on):
    model, tok = g9_on
    engine = Engine(model, tok)
    params = SamplingParams(temperature=1.0, top_k=None, seed=7, max_tokens=24)
    prompt = [tok.get_bos_token_id()]
    first = run(engine, prompt, params)[0]
    assert run(engine, prompt, params)[0] == first
    assert run(engine, prompt, params.with_(seed=8))[0] != first


def test_num_samples_expand_one_prefill_into_independent_rows(g9_on):
    model, tok = g9_on
    params = SamplingParams(temperature=1.0, top_k=None, seed=3, max_tokens=16)
    columns, _, _, stats = run(Engine(model, tok), [tok.get_bos_token_id()], params, num_samples=3)
    rows = list(zip(*columns, strict=True))
    assert len(rows) == 3 and len(set(rows)) > 1
    assert stats.prefill_tokens == 1


def test_top_k_one_is_greedy(g9_on):
    model, tok = g9_on
    engine = Engine(model, tok)
    prompt = expected_json("g9", "generate.json")["cases"][1]["prompt_ids"]
    sampled = run(engine, prompt, SamplingParams(temperature=0.8, top_k=1, max_tokens=12))[0]
    assert sampled == run(engine, prompt, GREEDY.with_(max_tokens=12))[0]


def test_repetition_penalty_changes_the_greedy_reply(g9_on):
    model, tok = g9_on
    engine = Engine(model, tok)
    prompt = expected_json("g9", "generate.json")["cases"][1]["prompt_ids"]
    plain = run(engine, prompt, GREEDY)[0]
    penalized = run(engine, prompt, GREEDY.with_(repetition_penalty=3.0))[0]
    assert penalized != plain
    assert len(set(t[0] for t in penalized)) >= len(set(t[0] for t in plain))


# --- scripted model: stops, tools, UTF-8 --------------------------------------------------------


def scripted(tok, script: list[int], prompt: list[int]) -> Engine:
    return Engine(ScriptedModel(script, len(prompt), tok.vocab_size), tok)


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_terminal_token_is_yielded_and_ends_the_reply(g9, stop):
    _, tok = g9
    prompt = [tok.get_bos_token_id()]
    script = tok.encode("hi") + [tok.encode_special(stop)] + tok.encode("never")
    columns, _, text, stats = run(scripted(tok, script, prompt), prompt, GREEDY)
    assert [c[0] for c in columns] == script[:3]
    assert text == "hi"  # the terminal token is not part of the text
    assert stats.stopped == "eos"


def test_calculator_call_forces_its_result_into_the_sequence(g9):
    _, tok = g9
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id()]
    expr = tok.encode("1+2")
    script = (
        [sp("<|python_start|>"), *expr, sp("<|python_end|>")] + [65] * 5 + tok.encode("ok") + [sp("<|assistant_end|>")]
    )
    events = list(scripted(tok, script, prompt).generate(prompt, GREEDY))
    tokens = [e.token for e in events if e.tokens]
    masks = [e.masks[0] for e in events if e.tokens]
    forced = [sp("<|output_start|>"), *tok.encode("3"), sp("<|output_end|>")]
    n = len(expr) + 2
    assert tokens[n : n + len(forced)] == forced
    assert masks[n : n + len(forced)] == [0] * len(forced)
    assert masks[:n] == [1] * n
    calls = [c for e in events for c in e.tool_calls]
    assert [(c.expression, c.result) for c in calls] == [("1+2", "3")]


def test_failed_calculator_call_forces_nothing(g9):
    _, tok = g9
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id()]
    script = [sp("<|python_start|>"), *tok.encode("1/0"), sp("<|python_end|>"), sp("<|assistant_end|>")]
    events = list(scripted(tok, script, prompt).generate(prompt, GREEDY))
    assert [e.token for e in events if e.tokens] == script
    assert [c.result for e in events for c in e.tool_calls] == [None]


def test_forced_tokens_count_toward_max_tokens(g9):
    _, tok = g9
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id()]
    script = [sp("<|python_start|>"), *tok.encode("2*3"), sp("<|python_end|>")] + [65] * 20
    n = len(tok.encode("2*3")) + 2
    columns, masks, _, _ = run(scripted(tok, script, prompt), prompt, GREEDY.with_(max_tokens=n + 2))
    assert len(columns) == n + 2
    assert [m[0] for m in masks][-2:] == [0, 0]


def test_multibyte_character_split_across_tokens_is_never_emitted_in_halves(g9):
    _, tok = g9
    prompt = [tok.get_bos_token_id()]
    # Byte tokens 0..255 are the raw bytes: "é" is 0xC3 0xA9, "🙂" is four bytes.
    script = [0xC3, 0xA9, 0xF0, 0x9F, 0x99, 0x82, ord("!")]
    events = scripted(tok, script, prompt).generate(prompt, GREEDY.with_(max_tokens=len(script)))
    deltas = [e.text for e in events if e.tokens or e.final]
    assert "".join(deltas) == "é🙂!" == tok.decode(script)
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:3] == ["", "é", ""]


def test_dangling_partial_character_is_flushed_as_replacement(g9):
    _, tok = g9
    prompt = [tok.get_bos_token_id()]
    script = [ord("a"), 0xE2, 0x82]  # an incomplete three-byte sequence at the end
    text = "".join(e.text for e in scripted(tok, script, prompt).generate(prompt, GREEDY.with_(max_tokens=3)))
    assert text == tok.decode(script)


def test_closing_the_stream_stops_generation(g9_on):
    model, tok = g9_on
    engine = Engine(model, tok)
    stream = engine.generate([tok.get_bos_token_id()], GREEDY)
    decoded = 0
    while decoded < 3:
        decoded += bool(next(stream).tokens)
    stream.close()
    assert engine.last_stats.stopped == "cancelled"
    assert engine.last_stats.generated_tokens == 3


def test_stats_report_speed_and_memory(g9_on):
    model, tok = g9_on
    _, _, _, stats = run(Engine(model, tok), [tok.get_bos_token_id(), 65, 66], GREEDY.with_(max_tokens=8))
    assert stats.prompt_tokens == 3 and stats.prefill_tokens == 3 and stats.generated_tokens == 8
    assert stats.ttft_s > 0 and stats.prefill_tps > 0 and stats.decode_tps > 0
    assert stats.peak_memory_bytes > 0
    assert "tok/s" in stats.summary()


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(max_tokens=-1), dict(top_k=-2), dict(min_p=1.0)],
)
def test_invalid_sampling_values_are_rejected(bad):
    with pytest.raises(nc.NanochatError):
        SamplingParams(**bad)


def test_prompt_longer_than_the_context_is_refused(g9_on):
    model, tok = g9_on
    with pytest.raises(nc.NanochatError, match="exceeds the model's context"):
        list(Engine(model, tok).generate([65] * (model.config.context_limit + 1), GREEDY))


# --- options through the Python API ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (dict(dtype="float64"), "unknown dtype 'float64'"),
        (dict(quantize=3), "unsupported quantization 3"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
        (dict(arch="g42"), "unknown architecture 'g42'"),
        (dict(step=-1), "step must be >= 0"),
    ],
)
def test_load_refuses_bad_options_with_the_clis_message(option, message):
    with pytest.raises(nc.NanochatError, match=message):
        nc.load(str(variant_dir("g1")), **option)


def test_load_refuses_an_empty_source():
    with pytest.raises(nc.NanochatError, match="source is empty"):
        nc.load("")


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_a_token_id_outside_the_vocabulary_is_refused_not_looked_up(g9_on, bad):
    """An embedding lookup does not check ids: MLX would read past the table and sample garbage."""
    model, tok = g9_on
    refused = rf"token id {bad} is outside the vocabulary \(0\.\.{tok.vocab_size - 1}\)"
    with pytest.raises(nc.NanochatError, match=refused):
        next(Engine(model, tok).generate([tok.get_bos_token_id(), bad], SamplingParams(max_tokens=2)))
