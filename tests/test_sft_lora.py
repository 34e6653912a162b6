"""LoRA on the MLX model: fresh adapters change nothing, fusing reproduces the adapted model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import variant_dir
from mlx.utils import tree_flatten

from nanochat_mlx import load
from nanochat_mlx.errors import NanochatError
from nanochat_mlx.training.lora import LoRALinear, LoRATrainer, adapter_arrays, apply_lora
from nanochat_mlx.training.lora_spec import TARGETS, fuse

IDS = mx.array([[1, 5, 9, 33, 7, 2, 8, 100]])


def model(quantize: int | None = None):
    return load(str(variant_dir("g9")), backend="mlx", dtype="float32", quantize=quantize)[0]


def base_weights(m) -> dict[str, np.ndarray]:
    """Every weight but the adapters, under the unadapted names."""
    return {k.replace(".base.", "."): np.array(v) for k, v in tree_flatten(m.parameters()) if "lora_" not in k}


def test_fresh_adapters_leave_the_logits_unchanged():
    m = model()
    before = np.array(m(IDS))
    apply_lora(m, rank=4, alpha=8, layers=-1, targets=TARGETS, seed=0)
    assert np.array_equal(np.array(m(IDS)), before)


def test_only_the_chosen_layers_of_the_last_blocks_are_adapted():
    m = model()
    apply_lora(m, rank=2, alpha=4, layers=2, targets=("c_q", "c_fc"), seed=0)
    adapted = sorted(p for p, mod in m.named_modules() if isinstance(mod, LoRALinear))
    assert adapted == [f"transformer.h.{i}.{p}" for i in (2, 3) for p in ("attn.c_q", "mlp.c_fc")]


def test_fusing_the_adapters_gives_the_adapted_models_logits():
    m = model()
    apply_lora(m, rank=4, alpha=8, layers=-1, targets=TARGETS, seed=0)
    for _, mod in m.named_modules():
        if isinstance(mod, LoRALinear):
            mod.lora_b = mx.random.normal(mod.lora_b.shape, key=mx.random.key(1)) * 0.05
    base = model()
    fuse(base, adapter_arrays(m), 8 / 4)
    np.testing.assert_allclose(np.array(base(IDS)), np.array(m(IDS)), atol=2e-5)


def test_qlora_trains_only_the_adapters_of_a_quantized_model():
    m = model(quantize=8)
    frozen = base_weights(m)
    apply_lora(m, rank=4, alpha=8, layers=-1, targets=TARGETS, seed=0)
    trainer = LoRATrainer(m, lr=1e-2, weight_decay=0.0)
    x, y = np.array(IDS)[:, :-1], np.array(IDS)[:, 1:]
    first, grads = trainer.loss_and_grads(x, y)
    assert grads and all("lora_" in name for name in grads)
    for _ in range(5):
        trainer.apply(trainer.loss_and_grads(x, y)[1], 1.0)
    assert trainer.loss_and_grads(x, y)[0] < first
    after = base_weights(m)
    assert after.keys() == frozen.keys() and all(np.array_equal(after[k], v) for k, v in frozen.items())


def test_an_unknown_target_is_one_line():
    with pytest.raises(NanochatError, match="unknown LoRA target 'c_qkv'"):
        apply_lora(model(), rank=4, alpha=8, layers=-1, targets=("c_qkv",), seed=0)
