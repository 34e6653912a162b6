"""What only the torch backend has: its preallocated KV cache, its runner, dtypes and int8 weights.

Parity with the reference, the engine's and the session's specs run on both backends in
test_parity.py, test_engine.py, test_session.py and test_sampling.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch backend tests need PyTorch (pip install 'nanochat-mlx[torch]')")

from conftest import expected_json, expected_npz, run_generation, variant_arch, variant_dir  # noqa: E402

import nanochat_mlx as nc  # noqa: E402
from nanochat_mlx import Engine, NanochatError, SamplingParams  # noqa: E402
from nanochat_mlx.backends.torch.cache import KVCache  # noqa: E402
from nanochat_mlx.backends.torch.model import (  # noqa: E402
    BATCH_KERNELS,
    TORCH_DTYPES,
    Linear,
    build_torch_model,
    default_dtype,
)
from nanochat_mlx.backends.torch.runner import TorchRunner  # noqa: E402
from nanochat_mlx.checkpoint import read_checkpoint  # noqa: E402

ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, top_k=None, max_tokens=32)


def load(name: str, dtype: str | None = "float32"):
    return nc.load(str(variant_dir(name)), arch=variant_arch(name), dtype=dtype, backend="torch")


@pytest.fixture(scope="module")
def g1():
    return load("g1")


@pytest.fixture(scope="module")
def g4():
    return load("g4")


@pytest.fixture(scope="module")
def g9():
    return load("g9")


def prompts(name: str) -> dict[str, list[int]]:
    return {p["name"]: p["ids"] for p in expected_json(name, "prompts.json")["prompts"]}


def generate_case(name: str, case_name: str) -> dict:
    return next(c for c in expected_json(name, "generate.json")["cases"] if c["name"] == case_name)


def ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def assert_close(found: torch.Tensor, expected: np.ndarray, what: str, atol: float = ATOL) -> None:
    found = found.cpu().numpy()
    assert found.shape == expected.shape, f"{what}: shape {found.shape}, expected {expected.shape}"
    diff = float(np.max(np.abs(found.astype(np.float64) - expected)))
    assert diff <= atol, f"{what}: max |logits - reference| = {diff:.3g} > {atol}"


def run(engine: Engine, prompt: list[int], params: SamplingParams, **kw) -> tuple[list, list, nc.GenerationStats]:
    """Token columns, masks and stats of one generation."""
    columns, masks, _, stats = run_generation(engine, prompt, params, **kw)
    return columns, masks, stats


# --- logits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["linear", "mv", "numpy"])
def test_every_one_row_kernel_keeps_float32_decode_parity(kernel) -> None:
    """Whichever kernel the load-time measurement picks, decoding stays within 1e-4 of the reference."""
    model = build_torch_model(read_checkpoint(str(variant_dir("g9"))), dtype="float32", gemv=kernel)
    assert model.lm_head.gemv.__name__ == f"_{kernel}"
    expected = expected_npz("g9", "logits_kv.npz")
    case = expected_json("g9", "prompts.json")["kv_cases"][0]
    tokens, n = prompts("g9")[case["prompt"]], case["prefill_len"]
    cache = model.make_cache()
    rows = [model(ids([tokens[:n]]), cache=cache)[0, -1]]
    rows += [model(ids([[t]]), cache=cache)[0, -1] for t in tokens[n : n + case["decode_steps"]]]
    assert_close(torch.stack(rows), expected[case["prompt"]], f"g9/{case['prompt']} ({kernel})")


@pytest.mark.parametrize("rows", [2, 5, 8, 17, 32])
@pytest.mark.parametrize("kernel", list(BATCH_KERNELS))
def test_every_few_row_kernel_computes_the_same_product(kernel, rows) -> None:
    weight, x = torch.randn(2500, 256), torch.randn(1, rows, 256)  # several slices, a shorter last one
    expected = torch.nn.functional.linear(x, weight)
    torch.testing.assert_close(BATCH_KERNELS[kernel](weight, x), expected, atol=1e-4, rtol=1e-5)  # sums reordered


def test_preparing_for_a_batch_measures_a_few_row_kernel_per_row_count_up_to_it(g1) -> None:
    model, _ = g1
    chosen = model.make_runner().prepare_rows(6)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert set(chosen) == {2, 4, 8} and all(set(m.batched) == {2, 4, 8} for m in linears)
    assert all(kernel in BATCH_KERNELS.values() for m in linears for kernel in m.batched.values())


def test_plain_decode_attention_stays_as_close_as_sdpa_in_bfloat16() -> None:
    """The plain one-token attention path (chosen at load where SDPA is slower) keeps bfloat16 decode
    as close to the float32 reference as SDPA does (the bfloat16 tolerance of the test below)."""
    from nanochat_mlx.backends.torch.model import Attention, plain_decode

    model = build_torch_model(read_checkpoint(str(variant_dir("g9"))), dtype="bfloat16")
    for module in model.modules():
        if isinstance(module, Attention):
            module.decode_attention = plain_decode
    expected = expected_npz("g9", "logits_kv.npz")
    case = expected_json("g9", "prompts.json")["kv_cases"][0]
    tokens, n = prompts("g9")[case["prompt"]], case["prefill_len"]
    cache = model.make_cache()
    rows = [model(ids([tokens[:n]]), cache=cache)[0, -1]]
    rows += [model(ids([[t]]), cache=cache)[0, -1] for t in tokens[n : n + case["decode_steps"]]]
    assert_close(torch.stack(rows), expected[case["prompt"]], "g9 bfloat16 (plain decode attention)", atol=0.25)


def test_smear_applies_to_the_first_token_of_a_chunk_after_a_prefix(g9) -> None:
    model, _ = g9
    tokens = prompts("g9")["p1_short"]
    expected = expected_npz("g9", "logits_full.npz")["p1_short"][10:]
    cache = model.make_cache()
    model(ids([tokens[:10]]), cache=cache)
    assert_close(model(ids([tokens[10:]]), cache=cache)[0], expected, "g9 chunk after a prefix")
    # The cached previous embedding is what makes it right: without it the first token differs.
    cache.trim(len(tokens) - 10)
    cache.smear_prev = None
    wrong = model(ids([tokens[10:]]), cache=cache)[0].cpu().numpy()
    assert np.max(np.abs(wrong[0] - expected[0])) > 1e-3


# --- generation through the engine ----------------------------------------------------------------


# --- the cache ------------------------------------------------------------------------------------


def test_cache_buffers_are_preallocated_and_windows_bounded(g4) -> None:
    model, _ = g4
    cache = model.make_cache()
    model(ids([[5]]), cache=cache)
    first = [t.data_ptr() for t in cache.keys]
    for step in range(200):
        model(ids([[step % 300 + 1]]), cache=cache)
    assert [t.data_ptr() for t in cache.keys] == first  # no reallocation while decoding
    for w, keys in zip(model.window_sizes, cache.keys, strict=True):
        assert keys.shape[2] == w + 1  # a ring of the w+1 keys a query can see


def test_full_attention_cache_grows_in_steps(g1) -> None:
    model, _ = g1
    cache = model.make_cache()
    sizes = set()
    for step in range(300):
        model(ids([[step % 300 + 1]]), cache=cache)
        sizes.add(cache.keys[0].shape[2])
    assert model.window_sizes[0] is None
    assert len(sizes) <= 2 and max(sizes) >= 300


def test_trim_then_refeed_gives_the_same_logits(g9) -> None:
    model, _ = g9
    tokens = prompts("g9")["p2_code_unicode"]
    expected = expected_npz("g9", "logits_full.npz")["p2_code_unicode"]
    runner = TorchRunner(model)
    cache = model.make_cache()
    model(ids([tokens[:30]]), cache=cache)
    assert runner.trim(cache, 5)
    assert runner.cache_length(cache) == 25
    assert_close(model(ids([tokens[25:40]]), cache=cache)[0], expected[25:40], "g9 after trim 5")
    assert runner.trim(cache, 1)
    assert_close(model(ids([tokens[39:40]]), cache=cache)[0], expected[39:40], "g9 after trim 1")


def test_trim_refused_once_a_window_dropped_needed_keys(g4) -> None:
    model, _ = g4
    tokens = prompts("g4")["p3_long"]
    expected = expected_npz("g4", "logits_full.npz")["p3_long"]
    cache = model.make_cache()
    model(ids([tokens[:100]]), cache=cache)  # past the 33-slot rings of the S layers
    assert not TorchRunner(model).trim(cache, 5)
    assert cache.length == 100
    assert TorchRunner(model).trim(cache, 1)  # the key it needs is still in the ring
    assert_close(model(ids([tokens[99:110]]), cache=cache)[0], expected[99:110], "g4 after trim 1")


def test_context_limit(g1) -> None:
    model, _ = g1
    limit = model.config.rope_len
    with pytest.raises(NanochatError, match="exceeds the model's limit"):
        model(ids([[1] * (limit + 1)]))
    cache = model.make_cache()
    model(ids([[1] * limit]), cache=cache)
    with pytest.raises(NanochatError, match="exceeds the model's limit"):
        model(ids([[1]]), cache=cache)


# --- runner and sampler ---------------------------------------------------------------------------


def test_runner_protocol(g9) -> None:
    model, _ = g9
    runner = TorchRunner(model)
    assert (runner.name, runner.dtype) == ("torch", "float32")
    assert runner.device.startswith(model.device.type)
    assert runner.context_limit == model.config.context_limit
    cache = runner.make_cache()
    assert isinstance(cache, KVCache)
    logits = runner.prefill([391, 325, 370], cache)
    assert logits.shape == (1, model.config.vocab_size) and logits.dtype == torch.float32
    cache, logits = runner.expand(cache, logits, 3)
    assert logits.shape == (3, model.config.vocab_size) and cache.batch == 3
    sample = runner.sampler(GREEDY, [[391, 325, 370]] * 3)
    column = sample(logits)
    runner.schedule(column)
    assert runner.to_list(column) == [int(logits[0].argmax())] * 3
    assert runner.decode(runner.tokens([5, 6, 7]), cache).shape == (3, model.config.vocab_size)
    assert runner.cache_length(cache) == 4
    runner.reset_peak_memory()
    assert runner.peak_memory() > 0


def test_loading_copies_weights_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "The given NumPy array is not writable"
        model, _ = load("g9-bf16", dtype=None)
    assert model.dtype == TORCH_DTYPES[default_dtype(model.device)]  # float32 on the CPU
    params = dict(model.named_parameters())
    assert all(p.device.type == model.device.type and p.dtype == model.dtype for p in params.values())
    assert not any(p.requires_grad for p in params.values())
    # Canonical names where the layout allows (tools tell embeddings from matmul weights by them).
    assert {"transformer.wte.weight", "value_embeds.1.weight", "transformer.h.0.mlp.c_fc.weight"} <= params.keys()


@pytest.mark.parametrize(("dtype", "atol"), [("bfloat16", 0.25), ("float16", 0.05)])
def test_half_precision_runs_close_to_float32(dtype: str, atol: float) -> None:
    model, _ = load("g9", dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    logits = model(ids([prompts("g9")["p2_code_unicode"]]))[0]
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    reference = expected_npz("g9", "logits_full.npz")["p2_code_unicode"]
    assert_close(logits, reference, f"g9 in {dtype}", atol=atol)


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(NanochatError, match="unknown dtype"):
        build_torch_model(read_checkpoint(str(variant_dir("g1"))), dtype="int8")


# --- weight-only int8 and int4 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide():
    """Random g9 weights wide enough (n_embd 128) for every linear layer to be quantized."""
    from nanochat_mlx.synthetic import random_checkpoint

    return random_checkpoint("d2", arch="g9", seed=3)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_swaps_the_linear_layers(wide, bits) -> None:
    from nanochat_mlx.backends.torch.model import QUANTIZED, build_torch_model

    kind = QUANTIZED[bits]
    model = build_torch_model(wide, quantize=bits)
    assert model.quantization == bits and model.dtype == torch.bfloat16
    assert isinstance(model.lm_head, kind)
    assert all(isinstance(b.mlp.c_fc, kind) and isinstance(b.attn.c_qkv, kind) for b in model.transformer.h)
    assert model.smear_gate.weight.dtype == torch.bfloat16  # 24 inputs: too small to gain anything


# (bits, mean |dlogit| / mean |logit|, greedy agreement): what each keeps of the bfloat16 model.
QUALITY = [(8, 0.05, 0.9), (4, 0.15, 0.7)]


@pytest.mark.parametrize(("bits", "max_delta", "min_agreement"), QUALITY)
def test_quantized_model_keeps_quality_in_decode_and_prefill(wide, bits, max_delta, min_agreement) -> None:
    from nanochat_mlx.backends.torch.model import build_torch_model

    prompt = torch.tensor([[wide.tokenizer.get_bos_token_id(), *range(100, 160)]])
    with torch.inference_mode():
        plain = build_torch_model(wide, dtype="bfloat16")(prompt)[0].float()
        model = build_torch_model(wide, quantize=bits)
        quant = model(prompt)[0].float()  # 61 rows: the dequantized-GEMM path
        cache = model.make_cache()
        model(prompt[:, :-1], cache=cache)
        step = model(prompt[:, -1:], cache=cache)[0, -1].float()  # one row: the packed kernel
    assert (quant - plain).abs().mean() < max_delta * plain.abs().mean()
    assert (quant.argmax(-1) == plain.argmax(-1)).float().mean() > min_agreement
    assert (step - quant[-1]).abs().max() < 0.05 * quant[-1].abs().max()


def test_int4_with_float16_activations_is_refused() -> None:
    with pytest.raises(NanochatError, match="int4 runs with bfloat16"):
        nc.load(str(variant_dir("g1")), backend="torch", quantize=4, dtype="float16")


def test_int8_with_float32_activations_is_refused() -> None:
    with pytest.raises(NanochatError, match="bfloat16 or float16"):
        nc.load(str(variant_dir("g1")), backend="torch", quantize=8, dtype="float32")
