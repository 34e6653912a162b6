"""MuonAdamW's state as numpy arrays and back, dtypes kept (so a resumed run steps exactly as before)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .optim import MuonAdamW

INTEGER_FIELDS = ("step", "rows")  # the step count; the rows a rowwise AdamW state covers


def _dtype_name(value: Any) -> str:
    return str(value.dtype).removeprefix("torch.").removeprefix("mlx.core.")


def optimizer_state(model: Any, optimizer: MuonAdamW) -> dict[str, np.ndarray]:
    """``{"<tensor>/<field>": float32 array}`` plus each field's dtype under ``"<tensor>/<field>#dtype"``
    (the step counts and an embedding table's touched rows as they are: integers)."""
    return dict(_state_items(model, optimizer))


def save_optimizer_state(path: Path, model: Any, optimizer: MuonAdamW) -> None:
    """:func:`optimizer_state` as an ``.npz`` (``np.load`` reads it), written one array at a time:
    a d20 model's Muon momentum alone is 1.6 GB, and a second copy of it all is memory a run lacks."""
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in _state_items(model, optimizer):
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
    os.replace(partial, path)


def _state_items(model: Any, optimizer: MuonAdamW) -> Iterator[tuple[str, np.ndarray]]:
    from . import _backend

    backend = _backend(model)
    for key, fields in optimizer.state.items():
        for field, value in fields.items():
            if field in INTEGER_FIELDS:
                yield f"{key}/{field}", np.asarray(value)
            else:
                yield f"{key}/{field}", backend.to_numpy(value)
                yield f"{key}/{field}#dtype", np.asarray(_dtype_name(value))


def _array(model: Any, value: np.ndarray, dtype: str) -> Any:
    """``value`` as the model's backend array of ``dtype``, on the model's device."""
    if type(model).__name__ == "TorchGPT":  # by name, so that MLX-only installs need no torch
        import torch

        return torch.from_numpy(np.asarray(value, np.float32)).to(device=model.device, dtype=getattr(torch, dtype))
    import mlx.core as mx

    return mx.array(np.asarray(value, np.float32)).astype(getattr(mx, dtype))


def load_optimizer_state(model: Any, optimizer: MuonAdamW, state: Mapping[str, np.ndarray]) -> None:
    """Restore what :func:`optimizer_state` saved (``state`` may be the opened ``.npz``: read as used)."""
    optimizer.state = {}
    for name, value in state.items():
        if name.endswith("#dtype"):
            continue
        key, field = name.rsplit("/", 1)
        entry = optimizer.state.setdefault(key, {})
        if field == "step":
            entry[field] = int(value)
        elif field == "rows":
            entry[field] = np.asarray(value, np.int64)
        else:
            entry[field] = _array(model, value, str(state[f"{name}#dtype"]))
