"""reference_optimizer / train_step reproduce the reference's setup_optimizer + MuonAdamW (HEAD, g9).

Expected values: fixtures/training/g9/steps.* (tests/make_training_expected.py ran HEAD's optimizer
eagerly on CPU for three steps from the fixture's weights, lrs scaled by init_lr_frac as chat_sft).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES
from test_training_grads import BACKENDS, GENERATIONS, expected

import nanochat_mlx as nc
from nanochat_mlx import training
from nanochat_mlx.checkpoint import read_checkpoint
from nanochat_mlx.errors import NanochatError

RUN = json.loads((FIXTURES / "training" / "g9" / "steps.json").read_text())


def start(backend: str):
    model, _ = nc.load(str(FIXTURES / "g9"), dtype="float32", backend=backend)
    return model, training.reference_optimizer(model, **RUN["optimizer"], init_lr_frac=RUN["init_lr_frac"])


def reference_weights() -> dict[str, np.ndarray]:
    data = np.load(FIXTURES / "training" / "g9" / "steps.npz")
    return {name: data[name] for name in data.files}


def as_reference(group: training.ParamGroup) -> dict:
    """A group as the reference's param_groups dict holds it (names instead of tensors)."""
    common = {"kind": group.kind, "lr": group.lr, "initial_lr": group.initial_lr, "weight_decay": group.weight_decay}
    if group.kind == "adamw":
        return common | {"betas": list(group.betas), "eps": group.eps, "names": sorted(group.names)}
    return (
        common
        | {"momentum": group.momentum, "ns_steps": group.ns_steps, "beta2": group.beta2}
        | {"names": sorted(group.names)}
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_equal_the_reference(backend):
    _, optimizer = start(backend)
    theirs = [group | {"names": sorted(group["names"])} for group in RUN["param_groups"]]
    assert [as_reference(group) for group in optimizer.param_groups] == theirs


@pytest.mark.parametrize("gen", GENERATIONS)
def test_param_groups_hold_every_tensor_once(gen):
    model, _ = nc.load(str(FIXTURES / gen), dtype="float32")
    optimizer = training.reference_optimizer(model, 0.004, 0.3, 0.02, 0.0)
    names = [n for g in optimizer.param_groups for n in g.names]
    assert sorted(names) == sorted(read_checkpoint(str(FIXTURES / gen)).weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_train_steps_equal_the_reference(backend):
    model, optimizer = start(backend)
    _, _, inputs, targets = expected("g9")
    losses = [
        training.train_step(model, optimizer, inputs, targets, s["lr_multiplier"], s["muon_momentum"])
        for s in RUN["schedule"]
    ]
    assert losses == pytest.approx(RUN["losses"], rel=1e-5)
    weights, ref = training.state_dict(model), reference_weights()
    assert sorted(weights) == sorted(ref)
    for name, w in ref.items():
        assert np.abs(weights[name] - w).max() <= 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_updates_from_the_reference_gradients_equal_its_steps(backend):
    """The optimizer arithmetic alone: fed the reference's own gradients, it lands on its weights."""
    model, optimizer = start(backend)
    step_grads = np.load(FIXTURES / "training" / "g9" / "step_grads.npz")
    first, _, _, _ = expected("g9")
    for step, s in enumerate(RUN["schedule"], 1):
        grads = first if step == 1 else {n: step_grads[f"step{step}/{n}"] for n in first}
        training.apply_gradients(model, optimizer, grads, s["lr_multiplier"], s["muon_momentum"])
    weights = training.state_dict(model)
    for name, w in reference_weights().items():
        assert np.abs(weights[name] - w).max() <= 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gen", ["g1", "g5", "g9"])
def test_state_dict_is_the_checkpoint_before_training(gen, backend):
    model, _ = nc.load(str(FIXTURES / gen), dtype="float32", backend=backend)
    weights = training.state_dict(model)
    stored = read_checkpoint(str(FIXTURES / gen)).weights
    assert sorted(weights) == sorted(stored)
    for name, w in stored.items():
        assert weights[name].dtype == np.float32 and np.array_equal(weights[name], w.astype(np.float32)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_changes_what_the_model_computes(backend):
    model, optimizer = start(backend)
    _, _, inputs, targets = expected("g9")
    before = training.train_step(model, optimizer, inputs, targets)
    after, _ = training.loss_and_grads(model, inputs, targets)
    assert after < before


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_is_a_snapshot(backend):
    model, optimizer = start(backend)
    before = training.state_dict(model)
    kept = {name: w.copy() for name, w in before.items()}
    _, _, inputs, targets = expected("g9")
    training.train_step(model, optimizer, inputs, targets)
    assert all(np.array_equal(before[n], kept[n]) for n in kept)
    assert not np.array_equal(training.state_dict(model)["lm_head.weight"], kept["lm_head.weight"])


def test_quantized_models_are_refused():
    model, _ = nc.load(str(FIXTURES / "g9"), quantize=4)
    with pytest.raises(NanochatError, match="cannot train a quantized model"):
        training.reference_optimizer(model, 0.004, 0.3, 0.02, 0.0)
