"""save_checkpoint writes what the reference's save_checkpoint writes, readable by torch, by the
reference's build_model and by our own loader."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES
from make_training_expected import MIRROR, extract
from test_training_grads import BACKENDS, expected

import nanochat_mlx as nc
from nanochat_mlx import training
from nanochat_mlx.errors import CheckpointError, NanochatError
from nanochat_mlx.ptfile import read_pt
from nanochat_mlx.tokenizer import Tokenizer
from nanochat_mlx.training.checkpoints import write_pt, write_tokenizer

NO_TORCH = importlib.util.find_spec("torch") is None
needs_torch = pytest.mark.skipif(NO_TORCH, reason="torch is not installed")
IDS = [[391, 5, 17, 230, 44, 399, 12, 8, 301, 77]]


def logits(model, ids=IDS) -> np.ndarray:
    if type(model).__name__ == "TorchGPT":
        import torch

        return model(torch.tensor(ids)).numpy()
    import mlx.core as mx

    return np.array(model(mx.array(ids)))


def trained(gen: str, backend: str = "mlx"):
    """The fixture model after one training step (so its weights are no longer the file's)."""
    model, tokenizer = nc.load(str(FIXTURES / gen), dtype="float32", backend=backend)
    _, _, inputs, targets = expected(gen)
    training.train_step(model, training.reference_optimizer(model, 0.004, 0.3, 0.02, 0.1), inputs, targets)
    return model, tokenizer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gen", ["g1", "g9"])
def test_saved_checkpoint_reloads_with_identical_logits(tmp_path, gen, backend):
    model, tokenizer = trained(gen, backend)
    training.save_checkpoint(tmp_path, 7, model, tokenizer)
    reloaded, _ = nc.load(str(tmp_path), dtype="float32", backend=backend)
    assert reloaded.spec.name == gen
    assert np.array_equal(logits(reloaded), logits(model))


def test_folder_holds_the_reference_files(tmp_path):
    model, tokenizer = trained("g9")
    training.save_checkpoint(tmp_path, 7, model, tokenizer, val_bpb=1.5, user_config={"run": "test"})
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["meta_000007.json", "model_000007.pt", "tokenizer/token_bytes.pt", "tokenizer/tokenizer.pkl"]
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        assert (tmp_path / "tokenizer" / name).read_bytes() == (FIXTURES / "g9" / "tokenizer" / name).read_bytes()


@pytest.mark.parametrize("gen", ["g1", "g4", "g9"])
def test_meta_records_step_loss_and_the_generations_model_config(tmp_path, gen):
    model, tokenizer = nc.load(str(FIXTURES / gen), dtype="float32")
    training.save_checkpoint(tmp_path, 3, model, tokenizer, val_bpb=0.9, user_config={"lr": 1.0})
    meta = json.loads((tmp_path / "meta_000003.json").read_text())
    original = json.loads(next((FIXTURES / gen).glob("meta_*.json")).read_text())["model_config"]
    assert meta == {"step": 3, "val_bpb": 0.9, "model_config": original, "user_config": {"lr": 1.0}}


def test_model_file_matches_state_dict_through_our_reader(tmp_path):
    model, tokenizer = trained("g9")
    training.save_checkpoint(tmp_path, 1, model, tokenizer)
    stored, weights = read_pt(tmp_path / "model_000001.pt"), training.state_dict(model)
    assert sorted(stored) == sorted(weights)
    assert all(np.array_equal(stored[n], w) for n, w in weights.items())


@needs_torch
def test_tokenizer_without_source_files_is_written_from_the_encoding(tmp_path):
    _, tokenizer = nc.load(str(FIXTURES / "g9"), dtype="float32")
    write_tokenizer(tmp_path, Tokenizer(tokenizer.enc))  # no source: nothing to copy
    again = Tokenizer.from_pickle(tmp_path / "tokenizer.pkl")
    assert again.enc._mergeable_ranks == tokenizer.enc._mergeable_ranks
    assert again.enc._special_tokens == tokenizer.enc._special_tokens
    token_bytes = read_pt_tensor(tmp_path / "token_bytes.pt")
    assert np.array_equal(token_bytes, read_pt_tensor(FIXTURES / "g9" / "tokenizer" / "token_bytes.pt"))


def read_pt_tensor(path: Path) -> np.ndarray:
    import torch

    return torch.load(path, weights_only=True).numpy()


ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "bf16": (np.arange(6, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16).reshape(2, 3),
    "f16": np.linspace(-1, 1, 5, dtype=np.float16),
    "i32": np.array([1, -2, 3], dtype=np.int32),
    "i64": np.array([[2**40]], dtype=np.int64),
    "scalar": np.array(2.5, dtype=np.float32),
}


WEIGHTS = {name: a for name, a in ARRAYS.items() if not np.issubdtype(a.dtype, np.integer)}


def test_write_pt_round_trips_through_our_reader(tmp_path):
    write_pt(tmp_path / "t.pt", WEIGHTS)
    back = read_pt(tmp_path / "t.pt")
    for name, array in WEIGHTS.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        assert back[name].tobytes() == array.tobytes(), name


def test_our_reader_refuses_the_integer_tensors_torch_can_read(tmp_path):
    """Integer tensors are written as torch.save does (torch.load reads them, below), but they are never
    weights, so the checkpoint reader refuses them, naming the tensor."""
    write_pt(tmp_path / "t.pt", {"i64": ARRAYS["i64"]})
    with pytest.raises(CheckpointError, match="i64"):
        read_pt(tmp_path / "t.pt")


@needs_torch
def test_torch_load_weights_only_reads_write_pt(tmp_path):
    import torch

    write_pt(tmp_path / "t.pt", ARRAYS)
    for mmap in (False, True):
        back = torch.load(tmp_path / "t.pt", weights_only=True, mmap=mmap)
        for name, array in ARRAYS.items():
            tensor = back[name]
            raw = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
            assert tuple(tensor.shape) == array.shape and raw.tobytes() == array.tobytes(), name


@needs_torch
def test_torch_load_reads_a_saved_checkpoint(tmp_path):
    import torch

    model, tokenizer = trained("g9")
    training.save_checkpoint(tmp_path, 2, model, tokenizer)
    state = torch.load(tmp_path / "model_000002.pt", weights_only=True)
    weights = training.state_dict(model)
    assert sorted(state) == sorted(weights)
    assert all(np.array_equal(state[n].numpy(), w) for n, w in weights.items())


BUILD_MODEL = """
import sys, numpy as np, torch
from nanochat.checkpoint_manager import build_model
model, tokenizer, meta = build_model(sys.argv[1], int(sys.argv[2]), torch.device("cpu"), "eval")
with torch.no_grad():
    np.save(sys.argv[3], model(torch.tensor({ids})).float().numpy())
"""


@needs_torch
@pytest.mark.skipif(not MIRROR.is_dir(), reason=f"the reference's git mirror is not at {MIRROR}")
@pytest.mark.parametrize("gen", ["g1", "g4", "g9"])
def test_reference_build_model_loads_a_saved_checkpoint(tmp_path, gen):
    model, tokenizer = trained(gen)
    ckpt = training.save_checkpoint(tmp_path / "ckpt", 5, model, tokenizer)
    tree = extract(gen, MIRROR, tmp_path / "tree")
    # The reference reads the tokenizer from $NANOCHAT_BASE_DIR/tokenizer: the folder holds one.
    env = dict(os.environ, PYTHONPATH=str(tree), NANOCHAT_BASE_DIR=str(ckpt), TORCHDYNAMO_DISABLE="1")
    out = tmp_path / "logits.npy"
    script = BUILD_MODEL.format(ids=IDS)
    subprocess.run([sys.executable, "-c", script, str(ckpt), "5", str(out)], env=env, check=True, capture_output=True)
    assert np.abs(np.load(out) - logits(model)).max() <= 1e-4


def test_unwritable_folder_is_one_clear_error(tmp_path):
    model, tokenizer = nc.load(str(FIXTURES / "g1"), dtype="float32")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NanochatError, match="cannot write the checkpoint"):
        training.save_checkpoint(tmp_path / "file" / "ckpt", 1, model, tokenizer)
