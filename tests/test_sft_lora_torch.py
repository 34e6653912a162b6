"""LoRA on the torch model is the MLX LoRA: same adapters, same steps, one file format, fusing.

The torch model fuses q, k, v (and the value-embedding gate) into ``c_qkv``; its adapters of c_q,
c_k, c_v act on their rows of that layer's output, so from the same start (the adapters' init
depends only on the seed and the layer's name) both backends compute the same losses step for
step (float32), each loads the other's ``adapters.safetensors``, and fusing gives the adapted logits.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_TORCH, variant_dir

from nanochat_mlx import load
from nanochat_mlx.training import lora, lora_spec

pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

ROWS = np.array([[1, 5, 9, 33, 7, 2, 8, 100, 4, 4, 11], [12, 13, 5, 6, 1, 40, 41, 42, 5, 43, 44]])
X, Y = ROWS[:, :-1], ROWS[:, 1:]
SETUP = {"rank": 4, "alpha": 8.0, "layers": 3, "targets": lora_spec.TARGETS, "seed": 7}


def adapted(backend: str, gen: str = "g9"):
    from nanochat_mlx.training import torch_lora

    module = torch_lora if backend == "torch" else lora
    model = load(str(variant_dir(gen)), backend=backend, dtype="float32")[0]
    module.apply_lora(model, **SETUP)
    return module, model


def logits(model) -> np.ndarray:
    if type(model).__name__ == "TorchGPT":
        import torch

        with torch.no_grad():
            return model.compute(torch.as_tensor(X)).numpy()
    import mlx.core as mx

    return np.array(model(mx.array(X)))


def randomize(module, model) -> None:
    """Non-zero B everywhere (fresh adapters change nothing, which would hide a misplaced one)."""
    arrays = module.adapter_arrays(model)
    rng = np.random.default_rng(3)
    for name, a in arrays.items():
        if name.endswith(".lora_b"):
            arrays[name] = rng.standard_normal(a.shape).astype(np.float32) * 0.05
    load_into(module, model, arrays)


def load_into(module, model, arrays) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        lora_spec.save_adapters(Path(d), arrays, {})
        module.load_adapters(Path(d), model)


@pytest.mark.parametrize("gen", ["g1", "g9"])
def test_both_backends_adapt_the_same_layers_with_the_same_initial_adapters(gen):
    (_, mlx_model), (torch_module, torch_model) = adapted("mlx", gen), adapted("torch", gen)
    mine, theirs = lora.adapter_arrays(mlx_model), torch_module.adapter_arrays(torch_model)
    assert sorted(mine) == sorted(theirs)
    assert all(np.array_equal(mine[n], theirs[n]) for n in mine)


def test_fresh_adapters_leave_the_torch_logits_unchanged():
    base = load(str(variant_dir("g9")), backend="torch", dtype="float32")[0]
    _, model = adapted("torch")
    assert np.array_equal(logits(model), logits(base))


@pytest.mark.parametrize("gen", ["g1", "g9"])
def test_torch_and_mlx_lora_take_the_same_steps(gen):
    runs = []
    for backend in ("mlx", "torch"):
        module, model = adapted(backend, gen)
        trainer = module.LoRATrainer(model, lr=1e-2, weight_decay=0.0)
        losses = []
        for _ in range(4):
            loss, grads = trainer.loss_and_grads(X, Y)
            trainer.apply(grads, 1.0)
            losses.append(loss)
        runs.append(losses)
    assert runs[0][0] > runs[0][-1]
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_adapters_trained_on_one_backend_load_in_the_other():
    mlx_module, mlx_model = adapted("mlx")
    torch_module, torch_model = adapted("torch")
    randomize(torch_module, torch_model)
    load_into(mlx_module, mlx_model, torch_module.adapter_arrays(torch_model))
    np.testing.assert_allclose(logits(mlx_model), logits(torch_model), atol=1e-4)


def test_fusing_torch_adapters_gives_the_adapted_models_logits():
    module, model = adapted("torch")
    randomize(module, model)
    base = load(str(variant_dir("g9")), backend="torch", dtype="float32")[0]
    lora_spec.fuse(base, module.adapter_arrays(model), SETUP["alpha"] / SETUP["rank"])
    np.testing.assert_allclose(logits(base), logits(model), atol=2e-5)


def test_only_the_adapters_train():
    module, model = adapted("torch")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainer = module.LoRATrainer(model, lr=1e-2, weight_decay=0.0)
    _, grads = trainer.loss_and_grads(X, Y)
    assert sorted(grads) == sorted(module.adapter_arrays(model))
    trainer.apply(grads, 1.0)
    assert all(np.array_equal(p.detach(), frozen[n]) for n, p in model.named_parameters() if "lora_" not in n)
