"""The sampling policy: written once, executed identically by both backends."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from conftest import expected_json, run_generation, variant_dir

import nanochat_mlx as nc
from nanochat_mlx import Engine, SamplingParams
from nanochat_mlx.sampling import REPETITION_WINDOW

HAS_TORCH = importlib.util.find_spec("torch") is not None
BACKENDS = ["mlx", pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed"))]
GREEDY = SamplingParams(temperature=0.0, top_k=None, max_tokens=24)


@pytest.fixture(scope="module", params=BACKENDS)
def runner(request):
    model, _ = nc.load(str(variant_dir("g1")), backend=request.param)
    return model.make_runner()


def logits_on(runner, rows: list[list[float]]):
    """(B, V) logits on the runner's device."""
    if runner.name == "torch":
        import torch

        return torch.tensor(rows, dtype=torch.float32)
    import mlx.core as mx

    return mx.array(rows, dtype=mx.float32)


def sample_ids(runner, params: SamplingParams, rows: list[list[float]], history: list[list[int]] | None = None):
    sampler = runner.sampler(params, history or [[0]] * len(rows))
    return runner.to_list(sampler(logits_on(runner, rows)))


def kept(runner, probs: list[float], **kw) -> set[int]:
    """Ids sampled at least once in 200 draws (the filters' survivors, with overwhelming odds)."""
    logits = [math.log(p) + 7.0 for p in probs]  # any offset: the filters see probabilities
    sampler = runner.sampler(SamplingParams(temperature=1.0, seed=0, **kw), [[0]] * 200)
    return set(runner.to_list(sampler(logits_on(runner, [logits] * 200))))


def test_greedy_takes_the_first_maximum(runner) -> None:
    assert sample_ids(runner, GREEDY, [[0.0, 2.0, 2.0, 1.0]]) == [1]


def test_logprobs_are_the_log_softmax_with_the_likeliest_first(runner) -> None:
    row = [0.5, 3.0, -1.0, 3.0 - 1e-3, 2.0, 0.0]
    expected = np.array(row) - np.log(np.exp(row).sum())
    sampler = runner.sampler(GREEDY, [[0]])
    chosen, values, ids = (runner.to_list(a) for a in sampler.logprobs(logits_on(runner, [row]), [4], 3))
    assert chosen == pytest.approx([expected[4]], abs=1e-6)
    assert ids == [[1, 3, 4]] and values[0] == pytest.approx(list(expected[[1, 3, 4]]), abs=1e-6)
    _, values, ids = (runner.to_list(a) for a in sampler.logprobs(logits_on(runner, [row]), [0], 0))
    assert values == [[]] and ids == [[]]


@pytest.mark.parametrize(
    ("filters", "survivors"),
    [
        (dict(top_k=None), {0, 1, 2, 3}),
        (dict(top_k=3), {0, 1, 3}),
        (dict(top_k=None, top_p=0.7), {1, 3}),  # 0.5 before the 0.3, 0.8 before the 0.15
        (dict(top_k=None, min_p=0.4), {1, 3}),  # floor 0.4 * 0.5 = 0.2
        (dict(top_k=1, top_p=0.99), {1}),
        (dict(top_k=3, top_p=0.9, min_p=0.2), {0, 1, 3}),
        (dict(top_k=3, top_p=0.9, min_p=0.35), {1, 3}),
    ],
)
def test_filters_keep_the_same_tokens_on_both_backends(runner, filters, survivors) -> None:
    assert kept(runner, [0.15, 0.5, 0.05, 0.3], **filters) == survivors


def test_repetition_penalty_reads_the_last_window_of_tokens(runner) -> None:
    # Token 3 leads; penalized (2x) it falls below token 0, unless it left the window.
    logits = [[2.9, -2.0, 1.0, 3.0]]
    params = GREEDY.with_(repetition_penalty=2.0)
    assert sample_ids(runner, params, logits, [[1, 3, 1]]) == [0]
    assert sample_ids(runner, params, logits, [[3] + [1] * REPETITION_WINDOW]) == [3]
    assert sample_ids(runner, params, [[2.9, -2.0, 1.0, 3.0]], [[2]]) == [3]


def test_negative_logits_are_multiplied_by_the_penalty(runner) -> None:
    # -1 * 3 = -3 drops token 1 below token 0 (-2).
    assert sample_ids(runner, GREEDY.with_(repetition_penalty=3.0), [[-2.0, -1.0]], [[1]]) == [0]


def test_same_logits_same_ids_on_both_backends() -> None:
    if not HAS_TORCH:
        pytest.skip("torch is not installed")
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, 400)).astype(np.float32).tolist()
    history = rng.integers(0, 400, size=(4, 30)).tolist()
    runners = [nc.load(str(variant_dir("g1")), backend=b)[0].make_runner() for b in ("mlx", "torch")]
    for penalty in (1.0, 1.3, 0.8):
        params = GREEDY.with_(repetition_penalty=penalty)
        ids = [sample_ids(r, params, rows, history) for r in runners]
        assert ids[0] == ids[1]


@pytest.mark.parametrize("variant", ["g1", "g4", "g9"])
def test_greedy_with_a_repetition_penalty_gives_the_same_tokens_on_both_backends(variant) -> None:
    if not HAS_TORCH:
        pytest.skip("torch is not installed")
    case = next(c for c in expected_json(variant, "generate.json")["cases"] if c["name"] == "p1_short")
    params = GREEDY.with_(repetition_penalty=1.5, max_tokens=24)
    columns = []
    for backend in ("mlx", "torch"):
        model, tok = nc.load(str(variant_dir(variant)), backend=backend)
        columns.append(run_generation(Engine(model, tok), case["prompt_ids"], params)[0])
    assert columns[0] == columns[1]
    plain = run_generation(Engine(model, tok), case["prompt_ids"], GREEDY)[0]
    assert columns[1] != plain[: len(columns[1])]  # the penalty changed the reply


def test_repetition_penalty_decoding_matches_a_plain_loop() -> None:
    """Greedy with a penalty through the pipelined engine, against full forwards and a hand-made penalty."""
    import mlx.core as mx

    model, tok = nc.load(str(variant_dir("g4")), backend="mlx")
    prompt = next(c for c in expected_json("g4", "generate.json")["cases"] if c["name"] == "p1_short")["prompt_ids"]
    penalty, n = 1.5, 12
    params = GREEDY.with_(max_tokens=n, repetition_penalty=penalty)
    columns, _, _, _ = run_generation(Engine(model, tok), prompt, params)
    history = list(prompt)
    for _ in range(n):
        logits = np.array(model(mx.array([history]))[0, -1])
        for token in set(history[-REPETITION_WINDOW:]):
            logits[token] = logits[token] * penalty if logits[token] < 0 else logits[token] / penalty
        history.append(int(logits.argmax()))
    assert [c[0] for c in columns] == history[len(prompt) :]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
def test_values_that_are_not_finite_numbers_are_refused(field, bad) -> None:
    with pytest.raises(nc.NanochatError, match="finite"):
        SamplingParams(**{field: float(bad)})


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300])
def test_a_vanishing_temperature_samples_the_maximum(runner, temperature) -> None:
    """Dividing raw logits by it would overflow: infinities tie (any of them drawn) or make NaN."""
    rows = [[3.0, 5.0, 4.0, -1.0, 2.0]] * 64
    ids = sample_ids(runner, SamplingParams(temperature=temperature, top_k=None, seed=0), rows)
    assert ids == [1] * 64


@pytest.mark.parametrize("seed", [-1, 2**63, 10**23])
def test_a_seed_no_generator_takes_is_refused(seed) -> None:
    with pytest.raises(nc.NanochatError, match=r"seed must be between 0 and 2\*\*63-1"):
        SamplingParams(seed=seed)
