"""Loading holds one copy of the model: peak memory while building from a bfloat16 checkpoint file
stays within 1.3x of the weights' bytes, on both backends (the file's pages are not kept, nor are
float32 copies made before the cast)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT

torch = pytest.importorskip("torch")

from nanochat_mlx.config import ModelConfig, get_spec  # noqa: E402
from nanochat_mlx.weights import expected_shapes  # noqa: E402

# ~100M parameters (200 MB in bfloat16): far more than what the interpreter's allocations vary by.
N_LAYER, N_EMBD, N_HEAD = 8, 1024, 8

# Runs in a fresh interpreter: builds the tiny g1 fixture first (the libraries' code pages and
# one-time allocations) and reads the (memory-mapped) checkpoint, so the baseline peak covers
# everything but the build itself. The peak is VmHWM, the peak RSS of this
# process's memory: ru_maxrss would also carry the parent's RSS at fork over the exec.
PROBE = """
import sys
def peak():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
from nanochat_mlx.backends import build_model
from nanochat_mlx.checkpoint import read_checkpoint
backend = sys.argv[2]
build_model(read_checkpoint(sys.argv[3]), backend, dtype="bfloat16").make_runner()
ckpt = read_checkpoint(sys.argv[1])
before = peak()
model = build_model(ckpt, backend, dtype="bfloat16")
after = peak()
print(before * 1024, after * 1024)
"""


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> tuple[Path, int]:
    """A native g1 checkpoint folder of random bfloat16 weights, and the weights' bytes."""
    folder = tmp_path_factory.mktemp("big-bf16")
    shutil.copytree(FIXTURES / "g1" / "tokenizer", folder / "tokenizer")
    meta = json.loads((FIXTURES / "g1" / "meta_000500.json").read_text())
    meta["model_config"].update(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_kv_head=N_HEAD)
    (folder / "meta_000500.json").write_text(json.dumps(meta))
    mc = meta["model_config"]
    config = ModelConfig(**mc, window_pattern="L", padded_vocab_size=mc["vocab_size"])
    gen = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        for name, shape in expected_shapes(config, get_spec("g1")).items()
    }
    torch.save(state, folder / "model_000500.pt")
    return folder, sum(t.numel() * 2 for t in state.values())


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_loading_a_bf16_checkpoint_peaks_within_1_3x_its_weights(bf16_checkpoint, backend) -> None:
    folder, weight_bytes = bf16_checkpoint
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), backend, str(FIXTURES / "g1")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    before, after = map(int, out.stdout.split())
    assert after - before <= 1.3 * weight_bytes, f"peak grew {(after - before) / weight_bytes:.2f}x the weights"
