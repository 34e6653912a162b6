"""The optimizer state a resumed run restores: every array, its dtype and the step counts."""

from __future__ import annotations

import numpy as np
from conftest import variant_dir

from nanochat_mlx import load
from nanochat_mlx.training import reference_optimizer, train_step
from nanochat_mlx.training.optimizer_state import load_optimizer_state, optimizer_state


def test_a_bfloat16_models_state_round_trips_with_its_dtypes(backend):
    model, _ = load(str(variant_dir("g9")), backend=backend, dtype="bfloat16")
    x = np.array([[1, 5, 9, 33, 7, 2, 8]])
    optimizer = reference_optimizer(model, 0.004, 0.3, 0.02, 0.0)
    train_step(model, optimizer, x[:, :-1], x[:, 1:])
    saved = optimizer_state(model, optimizer)
    fresh = reference_optimizer(model, 0.004, 0.3, 0.02, 0.0)
    load_optimizer_state(model, fresh, saved)
    assert fresh.state.keys() == optimizer.state.keys()
    for key, fields in optimizer.state.items():
        for field, value in fields.items():
            restored = fresh.state[key][field]
            if field == "step":
                assert restored == value
            else:
                assert str(restored.dtype) == str(value.dtype)
                assert np.array_equal(saved[f"{key}/{field}"], optimizer_state(model, fresh)[f"{key}/{field}"])
