"""loss_and_grads equals the reference's training loss and gradients, every generation, both backends.

Expected values: fixtures/training/<gen>/ (tests/make_training_expected.py ran each generation's
own ``GPT.forward(idx, targets)`` and ``loss.backward()`` on CPU in float32).
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache

import numpy as np
import pytest
from conftest import FIXTURES, variant_arch

import nanochat_mlx as nc
from nanochat_mlx import training
from nanochat_mlx.errors import NanochatError

GENERATIONS = [f"g{i}" for i in range(1, 10)]
NO_TORCH = importlib.util.find_spec("torch") is None
BACKENDS = ["mlx", pytest.param("torch", marks=pytest.mark.skipif(NO_TORCH, reason="torch is not installed"))]


def expected(gen: str) -> tuple[dict, float, np.ndarray, np.ndarray]:
    data = np.load(FIXTURES / "training" / gen / "grads.npz")
    grads = {name.removeprefix("grad/"): data[name] for name in data.files if name.startswith("grad/")}
    loss = json.loads((FIXTURES / "training" / gen / "expected.json").read_text())["loss"]
    return grads, loss, data["inputs"], data["targets"]


@cache
def computed(gen: str, backend: str) -> tuple[float, dict[str, np.ndarray]]:
    model, _ = nc.load(str(FIXTURES / gen), dtype="float32", backend=backend, arch=variant_arch(gen))
    _, _, inputs, targets = expected(gen)
    return training.loss_and_grads(model, inputs.tolist(), targets.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_loss_equals_reference(gen, backend):
    _, ref_loss, _, _ = expected(gen)
    loss, _ = computed(gen, backend)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_gradients_equal_reference_per_tensor(gen, backend):
    ref, _, _, _ = expected(gen)
    _, grads = computed(gen, backend)
    assert sorted(grads) == sorted(ref)
    for name, g in ref.items():
        assert grads[name].dtype == np.float32 and grads[name].shape == g.shape, name
        assert np.abs(grads[name] - g).max() <= 1e-4 * np.abs(g).max(), name


def test_padded_vocab_rows_get_zero_gradient():
    _, grads = computed("g9", "mlx")
    for name in ("lm_head.weight", "transformer.wte.weight", "value_embeds.1.weight"):
        assert grads[name].shape[0] == 448 and not grads[name][400:].any(), name


def test_a_batch_without_any_target_is_refused():
    model, _ = nc.load(str(FIXTURES / "g1"), dtype="float32")
    with pytest.raises(NanochatError, match="every target is -1"):
        training.loss_and_grads(model, [[1, 2, 3]], [[-1, -1, -1]])
