"""The embedding tables train on their batch's rows only, and land exactly where dense AdamW does.

Spec: ``reference_optimizer`` keeps the token and value-embedding tables' gradients as rows
(``RowGrad``) and their AdamW moments for the rows some step touched; the weights after several
steps over different token sets equal those of the same optimizer run dense (every group
``rowwise=False``: full-table gradients and moments), on both backends, in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, FIXTURES

import nanochat_mlx as nc
from nanochat_mlx import training
from nanochat_mlx.training.optimizer_state import load_optimizer_state, optimizer_state

# Three batches over different ids: the second leaves out most of the first's and brings new ones.
BATCHES = [
    [[1, 5, 9, 33, 7, 2, 8, 9], [4, 4, 11, 12, 13, 5, 6, 1]],
    [[40, 41, 42, 5, 43, 44, 45, 46], [47, 48, 2, 49, 50, 51, 52, 53]],
    [[60, 1, 61, 62, 40, 63, 64, 65], [66, 67, 68, 69, 70, 71, 72, 73]],
]


def run(backend: str, rowwise: bool, batches=BATCHES) -> tuple[list[float], dict[str, np.ndarray], object]:
    model, _ = nc.load(str(FIXTURES / "g9"), dtype="float32", backend=backend)
    optimizer = training.reference_optimizer(model, 0.004, 0.3, 0.02, 0.1)
    for group in optimizer.param_groups:
        group.rowwise = group.rowwise and rowwise
    losses = [training.train_step(model, optimizer, [r[:-1] for r in b], [r[1:] for r in b]) for b in batches]
    return losses, training.state_dict(model), optimizer


@pytest.mark.parametrize("backend", BACKENDS)
def test_rowwise_adamw_equals_dense_adamw_over_steps_with_different_tokens(backend):
    rows_losses, rows_weights, _ = run(backend, rowwise=True)
    dense_losses, dense_weights, _ = run(backend, rowwise=False)
    assert rows_losses == dense_losses
    for name, w in dense_weights.items():
        assert np.abs(rows_weights[name] - w).max() <= 1e-7, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_moments_cover_exactly_the_rows_seen(backend):
    _, weights, optimizer = run(backend, rowwise=True)
    seen = np.unique([t for b in BATCHES for r in b for t in r[:-1]])
    tables = [name for name in weights if name == "transformer.wte.weight" or name.startswith("value_embeds.")]
    assert len(tables) > 1
    for name in tables:
        state = optimizer.state[name]
        assert np.array_equal(state["rows"], seen), name
        assert tuple(state["exp_avg"].shape) == tuple(state["exp_avg_sq"].shape) == (len(seen), weights[name].shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_rowwise_optimizer_steps_exactly_as_one_run(backend):
    _, whole, _ = run(backend, rowwise=True)
    model, _ = nc.load(str(FIXTURES / "g9"), dtype="float32", backend=backend)
    optimizer = training.reference_optimizer(model, 0.004, 0.3, 0.02, 0.1)
    b = BATCHES[0]
    training.train_step(model, optimizer, [r[:-1] for r in b], [r[1:] for r in b])
    saved = optimizer_state(model, optimizer)
    resumed = training.reference_optimizer(model, 0.004, 0.3, 0.02, 0.1)
    load_optimizer_state(model, resumed, saved)
    for b in BATCHES[1:]:
        training.train_step(model, resumed, [r[:-1] for r in b], [r[1:] for r in b])
    for name, w in training.state_dict(model).items():
        assert np.array_equal(w, whole[name]), name


def test_row_gradients_are_the_dense_gradients_rows():
    model, _ = nc.load(str(FIXTURES / "g9"), dtype="float32")
    b = BATCHES[0]
    inputs, targets = [r[:-1] for r in b], [r[1:] for r in b]
    _, rows = training.loss_and_row_grads(model, inputs, targets)
    _, dense = training.loss_and_grads(model, inputs, targets)
    g = rows["transformer.wte.weight"]
    assert np.array_equal(g.rows, np.unique(inputs))
    assert np.array_equal(g.dense(), dense["transformer.wte.weight"])


def test_row_gradients_of_micro_batches_sum_as_dense_ones():
    rng = np.random.default_rng(0)
    a = training.RowGrad(np.array([1, 3, 6]), rng.standard_normal((3, 4)).astype(np.float32), (8, 4))
    b = training.RowGrad(np.array([0, 3, 7]), rng.standard_normal((3, 4)).astype(np.float32), (8, 4))
    expected = a.dense() + b.dense()
    a += b
    assert np.array_equal(a.rows, [0, 1, 3, 6, 7])
    assert np.array_equal(a.dense(), expected)
