"""Weights holding NaN or infinity (what a diverged training run saves) are refused at load.

Such a model would print garbage (greedy) or fail inside the sampler; the load names the tensor
and the count instead, on both backends, and quantizing or casting does not hide it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from craft import PtFile, assert_clean_failure, checkpoint_dir, fixture_state, run_cli

from nanochat_mlx.backends import build_model
from nanochat_mlx.checkpoint import read_checkpoint
from nanochat_mlx.errors import CheckpointError

Q = "transformer.h.0.attn.c_q.weight"  # (48, 48) in g1


def broken_checkpoint(tmp_path: Path, edit: dict[tuple[int, int], float]) -> Path:
    """The g1 fixture with ``edit``'s elements of ``Q`` overwritten."""
    folder = checkpoint_dir(tmp_path / "ckpt")
    state = fixture_state()
    q = np.array(state[Q])
    for index, value in edit.items():
        q[index] = value
    state[Q] = q
    PtFile.of(state).write(folder / "model_000500.pt")
    return folder


@pytest.mark.parametrize(
    "edit,found",
    [({(0, 0): np.nan}, "1 NaN of its 2,304 values"), ({(3, 1): np.inf, (7, 2): -np.inf}, "2 infinite of its 2,304")],
)
def test_nonfinite_tensor_is_refused_by_name(tmp_path: Path, backend: str, edit: dict, found: str) -> None:
    ckpt = read_checkpoint(str(broken_checkpoint(tmp_path, edit)))
    with pytest.raises(CheckpointError) as err:
        build_model(ckpt, backend)
    assert Q in str(err.value) and found in str(err.value), str(err.value)


@pytest.mark.parametrize("dtype,quantize", [("bfloat16", None), ("bfloat16", 8)])
def test_cast_and_quantization_do_not_hide_a_nan(tmp_path: Path, backend: str, dtype: str, quantize: int) -> None:
    ckpt = read_checkpoint(str(broken_checkpoint(tmp_path, {(5, 5): np.nan})))
    with pytest.raises(CheckpointError, match="1 NaN"):
        build_model(ckpt, backend, dtype=dtype, quantize=quantize)


def test_large_finite_weights_still_load(tmp_path: Path, backend: str) -> None:
    """A tensor whose sum overflows float32 is finite: it loads."""
    big = {(i, j): 3e38 for i in range(4) for j in range(4)}
    model = build_model(read_checkpoint(str(broken_checkpoint(tmp_path, big))), backend)
    assert model is not None


def test_cli_refuses_a_diverged_checkpoint_in_one_line(tmp_path: Path) -> None:
    folder = broken_checkpoint(tmp_path, {(0, 0): np.nan})
    assert_clean_failure(run_cli(folder), str(folder), Q, "diverged")
