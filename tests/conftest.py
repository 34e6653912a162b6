"""Shared, generic helpers for the test suite: where the fixtures live and how to read them."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

# Test modules import these helpers with ``from conftest import ...``; keep that working whether
# or not tests/ is a package.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

# Every variant folder of the reference fixtures (see fixtures/README.md).
ALL_VARIANTS = [
    "g1",
    "g2",
    "g3",
    "g4",
    "g5",
    "g6",
    "g7",
    "g8",
    "g9",
    "g1-bf16",
    "g1-orig-mod",
    "g1-multistep",
    "g9-bf16",
    "g9-orig-mod",
    "g9-multistep",
]

# g5, g6 and g7 are identical on disk: the generation has to be named for g6 and g7.
ARCH_OVERRIDE = {"g6": "g6", "g7": "g7"}

TOKENS_TERMINAL = ("<|assistant_end|>", "<|bos|>")

HAS_TORCH = importlib.util.find_spec("torch") is not None
# Specs that hold for both backends take the ``backend`` fixture (or parametrize over BACKENDS).
BACKENDS = ["mlx", pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed"))]


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> str:
    return request.param


def ids_for(model, rows: list[list[int]]):
    """Token ids (B, T) as the model's backend takes them."""
    if model.make_runner().name == "torch":
        import torch

        return torch.tensor(rows, dtype=torch.long, device=model.device)
    import mlx.core as mx

    return mx.array(rows)


def to_numpy(x) -> np.ndarray:
    """An MLX array or a torch tensor as numpy."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.array(x)


def variant_dir(name: str) -> Path:
    """The fixture folder of one variant (``g1``, ``g9-bf16``, ...)."""
    path = FIXTURES / name
    if not path.is_dir():
        raise FileNotFoundError(path)
    return path


def variant_arch(name: str) -> str | None:
    """The ``arch=`` a variant must be loaded with (None: the files tell)."""
    return ARCH_OVERRIDE.get(name)


def expected_json(name: str, file: str) -> dict:
    """One of a variant's ``expected/*.json`` files, parsed."""
    return json.loads((variant_dir(name) / "expected" / file).read_text(encoding="utf-8"))


def expected_npz(name: str, file: str) -> dict[str, np.ndarray]:
    """One of a variant's ``expected/*.npz`` files as a dict of arrays."""
    with np.load(variant_dir(name) / "expected" / file) as data:
        return {k: data[k] for k in data.files}


def run_generation(engine, prompt: list[int], params, **kw) -> tuple[list, list, str, object]:
    """Token columns, masks, streamed text and final stats of one ``engine.generate`` call."""
    columns, masks, text, stats = [], [], "", None
    for event in engine.generate(prompt, params, **kw):
        if event.tokens:
            columns.append(event.tokens)
            masks.append(event.masks)
        if event.final:
            stats = event.stats
        text += event.text
    return columns, masks, text, stats


def copy_variant(name: str, dest: Path) -> Path:
    """A writable copy of a variant folder (without ``expected/``) at ``dest``."""
    shutil.copytree(variant_dir(name), dest, ignore=shutil.ignore_patterns("expected"))
    return dest


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def private_user_config(tmp_path_factory) -> Path:
    """Every test (and every subprocess it starts) remembers its chosen model in a folder of its own,
    never in the user's real config dir."""
    folder = tmp_path_factory.mktemp("user-config")
    previous = os.environ.get("NANOCHAT_MLX_CONFIG_DIR")
    os.environ["NANOCHAT_MLX_CONFIG_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("NANOCHAT_MLX_CONFIG_DIR", None)
    else:
        os.environ["NANOCHAT_MLX_CONFIG_DIR"] = previous
