"""MLX inference: products split over CPU streams and the compiled decode step compute the same numbers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import variant_dir

import nanochat_mlx as nc
from nanochat_mlx.backends.mlx.lanes import Lanes
from nanochat_mlx.loading import from_checkpoint
from nanochat_mlx.options import LoadOptions
from nanochat_mlx.sampling import SamplingParams
from nanochat_mlx.synthetic import geometry_config, random_checkpoint


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("positions", [1, 7])
def test_a_split_product_equals_the_whole_one_bit_for_bit(dtype, positions):
    layer = nn.Linear(96, 1040, bias=False)  # 1040 rows: lanes of 512 and 528, both whole 16-row tiles
    layer.set_dtype(dtype)
    x = mx.random.normal((1, positions, 96), key=mx.random.key(0)).astype(dtype)
    split = Lanes(2)(layer, x)
    assert split.dtype == dtype
    assert np.array_equal(np.array(split.astype(mx.float32)), np.array(layer(x).astype(mx.float32)))


def test_quantized_layers_run_whole():
    layer = nn.Linear(128, 1024, bias=False)
    quantized = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=8)
    x = mx.random.normal((1, 1, 128), key=mx.random.key(1))
    assert np.array_equal(np.array(Lanes(2)(quantized, x)), np.array(quantized(x)))


def test_cached_decode_with_split_products_matches_the_whole_forward_pass():
    # vocab 1024 and n_embd 128: the head (1024 rows) and the MLP (512 rows) are split on a 2+ core CPU.
    ckpt = random_checkpoint(geometry_config("d2", "g1", vocab_size=1024, sequence_len=64), arch="g1", seed=2)
    model = from_checkpoint(ckpt, LoadOptions(ckpt.name, arch="g1", dtype="float32", backend="mlx")).model
    tokens = [1, 5, 9, 200, 17, 3, 800, 42]
    whole = np.array(model(mx.array([tokens])))[0]  # no cache: every product whole
    cache = model.make_cache()
    stepped = [np.array(model(mx.array([tokens[:4]]), cache=cache))[0]]
    stepped += [np.array(model(mx.array([[t]]), cache=cache))[0] for t in tokens[4:]]
    np.testing.assert_allclose(np.concatenate(stepped), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["g1", "g9", "g9-bf16"])
def test_the_compiled_decode_step_computes_the_whole_forward_pass(variant):
    # 140 steps from a 5-token prompt: g9's windows (64 and 128 keys) fill and wrap; its smear memory carries.
    model, _ = nc.load(str(variant_dir(variant)), backend="mlx")
    tokens = [1, 5, 9, 200, 17]
    cache = model.make_cache()
    mx.eval(model(mx.array([tokens[:-1]]), cache=cache))
    for _ in range(140):
        stepped = model.decode(mx.array(tokens[-1:]), cache)
        whole = model(mx.array([tokens]))[:, -1]  # no cache: the window masks are built from positions
        np.testing.assert_allclose(np.array(stepped), np.array(whole), atol=2e-5, rtol=0)
        tokens.append(int(mx.argmax(whole, axis=-1).item()))
    assert cache[0].offset == len(tokens) - 1


def test_layers_without_a_plain_weight_run_whole():
    class Wrapped(nn.Module):  # as LoRA wraps a Linear: no ``weight`` of its own
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(64, 1024, bias=False)

        def __call__(self, x):
            return self.inner(x)

    layer = Wrapped()
    x = mx.random.normal((1, 1, 64), key=mx.random.key(2))
    assert np.array_equal(np.array(Lanes(2)(layer, x)), np.array(layer(x)))


def test_generation_runs_on_a_new_thread_after_another_thread_used_the_model():
    # The TUI decodes on a fresh worker thread per reply and MLX streams belong to their thread:
    # every thread gets its own lanes, and the compiled step still runs there.
    ckpt = random_checkpoint(geometry_config("d2", "g1", vocab_size=1024, sequence_len=64), arch="g1", seed=2)
    engine = from_checkpoint(ckpt, LoadOptions(ckpt.name, arch="g1", dtype="float32", backend="mlx")).engine
    params = SamplingParams(temperature=0.0, top_k=None, max_tokens=6)

    def reply() -> list[int]:
        return [t for event in engine.generate([1, 5, 9], params, stop_tokens=()) for t in event.tokens]

    replies = [reply()]
    for _ in range(2):
        with ThreadPoolExecutor(1) as pool:  # a new thread each time
            replies.append(pool.submit(reply).result())
    assert len(replies[0]) == 6 and replies[1] == replies[0] and replies[2] == replies[0]
