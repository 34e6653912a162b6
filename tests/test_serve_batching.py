"""Batched decoding (``runner.decode_rows``): rows at different positions decode together exactly as alone.

The server's scheduler decodes every running request in one step; each row keeps its own cache
(position, sliding windows, g9's smear memory). These tests check the backends' part: a row's
logits in a batch equal its logits decoded alone, whatever the other rows' lengths and whenever
it joined.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import expected_json, variant_arch, variant_dir

import nanochat_mlx as nc

BACKENDS = ["mlx", "torch"]
STEPS = 12


def prompts(variant: str) -> list[list[int]]:
    """The fixture's prompts: 1 to 161 tokens, past g4's 32-key window."""
    return [c["prompt_ids"] for c in expected_json(variant, "generate.json")["cases"] if c["num_samples"] == 1]


def as_numpy(logits) -> np.ndarray:
    return np.array(logits.tolist(), dtype=np.float32)


def solo(runner, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and per-step logits of one row decoded alone (the engine's path)."""
    cache = runner.make_cache()
    logits = runner.prefill(prompt, cache)
    tokens, steps = [], []
    for _ in range(STEPS):
        steps.append(as_numpy(logits)[0])
        tokens.append(int(np.argmax(steps[-1])))
        logits = runner.decode(runner.tokens(tokens[-1:]), cache)
    return tokens, steps


@pytest.fixture(scope="module", params=[(b, v) for b in BACKENDS for v in ("g1", "g4", "g9")], ids=str)
def runner(request):
    backend, variant = request.param
    model, _ = nc.load(str(variant_dir(variant)), arch=variant_arch(variant), backend=backend)
    runner = model.make_runner()
    runner.prepare_rows(8)  # as the server does: the few-row kernels measured for its batch
    return runner, variant


def test_rows_joining_at_different_steps_decode_as_they_would_alone(runner):
    runner, variant = runner
    cases = prompts(variant)
    alone = [solo(runner, p) for p in cases]
    # Row k joins the batch after k steps of the rows before it, so positions differ by row and by join time.
    caches, tokens, steps = [], [[] for _ in cases], [[] for _ in cases]
    pending: list = [None] * len(cases)
    for step in range(STEPS + len(cases)):
        if step < len(cases):
            cache = runner.make_cache()
            logits = as_numpy(runner.prefill(cases[step], cache))[0]
            caches.append(cache)
            pending[step] = logits
        live = [i for i in range(len(caches)) if len(tokens[i]) < STEPS]
        if not live:
            break
        for i in live:
            steps[i].append(pending[i])
            tokens[i].append(int(np.argmax(pending[i])))
        logits = as_numpy(runner.decode_rows([tokens[i][-1] for i in live], [caches[i] for i in live]))
        for row, i in enumerate(live):
            pending[i] = logits[row]
    for i, (solo_tokens, solo_steps) in enumerate(alone):
        assert tokens[i] == solo_tokens, f"row {i}"
        np.testing.assert_allclose(np.stack(steps[i]), np.stack(solo_steps), atol=1e-4, rtol=0)


def test_a_cloned_cache_continues_independently_of_its_original(runner):
    runner, variant = runner
    prompt = prompts(variant)[2]
    cache = runner.make_cache()
    first = runner.prefill(prompt, cache)
    copy = runner.clone_cache(cache)
    token = int(np.argmax(as_numpy(first)[0]))
    # Advance the original by two other tokens; the copy must still continue from the prompt alone.
    runner.decode_rows([token + 1], [cache])
    runner.decode_rows([token + 2], [cache])
    from_copy = as_numpy(runner.decode_rows([token], [copy]))[0]
    reference = runner.make_cache()
    runner.prefill(prompt, reference)
    expected = as_numpy(runner.decode(runner.tokens([token]), reference))[0]
    np.testing.assert_allclose(from_copy, expected, atol=1e-5, rtol=0)
    assert runner.cache_bytes(copy) > 0


def test_prompt_chunks_riding_along_decoding_rows_prefill_as_they_would_alone(runner):
    """A new prompt fed as extra positions of decode steps (in two chunks, the second past g4's
    window) ends with the logits of a prefill alone, and the decoding rows are unaffected."""
    runner, variant = runner
    cases = prompts(variant)
    decoding, riding = cases[1], max(cases, key=len)
    cut = len(riding) // 2
    (rider_tokens, rider_steps), (row_tokens, row_steps) = solo(runner, riding), solo(runner, decoding)
    row_cache, rider_cache = runner.make_cache(), runner.make_cache()
    runner.prefill(decoding, row_cache)
    logits = as_numpy(runner.decode_rows([row_tokens[0], *riding[:cut]], [row_cache, rider_cache], [1, cut]))
    np.testing.assert_allclose(logits[0], row_steps[1], atol=1e-4, rtol=0)
    rest = len(riding) - cut
    logits = as_numpy(runner.decode_rows([row_tokens[1], *riding[cut:]], [row_cache, rider_cache], [1, rest]))
    np.testing.assert_allclose(logits, np.stack([row_steps[2], rider_steps[0]]), atol=1e-4, rtol=0)
    assert int(np.argmax(logits[1])) == rider_tokens[0]
    logits = as_numpy(runner.decode_rows([row_tokens[2], rider_tokens[0]], [row_cache, rider_cache]))
    np.testing.assert_allclose(logits, np.stack([row_steps[3], rider_steps[1]]), atol=1e-4, rtol=0)
