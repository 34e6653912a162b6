"""nanochat_mlx.convert: MLX-native folders that reload exactly, refusal of non-empty outputs, quantization."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import variant_dir

import nanochat_mlx as nc
from nanochat_mlx.backends.mlx.model import build_mlx_model
from nanochat_mlx.checkpoint import read_checkpoint
from nanochat_mlx.config import ModelConfig
from nanochat_mlx.convert import convert
from nanochat_mlx.errors import NanochatError
from nanochat_mlx.loading import load_model
from nanochat_mlx.options import LoadOptions
from nanochat_mlx.synthetic import random_checkpoint
from nanochat_mlx.weights import read_safetensors

IDS = [5, 17, 42, 99, 3, 250, 7, 64, 11, 300, 2, 8]


@pytest.mark.parametrize("variant,arch", [("g1", None), ("g5", "g6"), ("g9", None)])
def test_round_trip_logits_exact(tmp_path, variant, arch):
    out = convert(str(variant_dir(variant)), tmp_path / "out", arch=arch)
    cfg = json.loads((out / "config.json").read_text())
    ours = cfg["nanochat_mlx"]
    assert cfg["model_type"] == "nanochat"
    assert ours["generation"] == (arch or variant)
    assert ours["quantization"] is None
    assert {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "max_position_embeddings"} <= cfg.keys()  # fmt: skip
    assert (out / "tokenizer.pkl").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "out"], "temporary folder left behind"

    src_model, tok = nc.load(str(variant_dir(variant)), arch=arch, dtype="float32")
    model, tok2 = nc.load(str(out), dtype="float32")
    assert model.spec.name == (arch or variant)
    assert read_checkpoint(str(out)).files.layout == "converted"
    x = mx.array([[tok.get_bos_token_id(), *IDS]])
    assert np.array_equal(np.array(src_model(x)), np.array(model(x)))
    assert tok2.encode("hello world") == tok.encode("hello world")
    # the KV-cached path too
    cache_a, cache_b = src_model.make_cache(), model.make_cache()
    for t in x[0].tolist():
        a = src_model(mx.array([[t]]), cache=cache_a)
        b = model(mx.array([[t]]), cache=cache_b)
        assert np.array_equal(np.array(a), np.array(b))


def test_bfloat16_round_trip(tmp_path):
    out = convert(str(variant_dir("g9")), tmp_path / "bf16", dtype="bfloat16")
    assert all(w.dtype.name == "bfloat16" for w in read_safetensors(out / "model.safetensors").values())
    src, tok = nc.load(str(variant_dir("g9")), dtype="bfloat16")
    model, _ = nc.load(str(out), dtype="bfloat16")
    x = mx.array([[tok.get_bos_token_id(), *IDS]])
    assert np.array_equal(np.array(src(x)), np.array(model(x)))


def test_refuses_non_empty_out(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(NanochatError, match="busy"):
        convert(str(variant_dir("g1")), out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    file_out = tmp_path / "afile"
    file_out.write_text("x")
    with pytest.raises(NanochatError, match="afile"):
        convert(str(variant_dir("g1")), file_out)


def test_empty_out_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    out = convert(str(variant_dir("g1")), tmp_path / "empty")
    assert (out / "model.safetensors").is_file()


def test_failed_conversion_leaves_nothing(tmp_path):
    with pytest.raises(NanochatError):
        convert(str(variant_dir("g1")), tmp_path / "out", dtype="float64")
    assert list(tmp_path.iterdir()) == []


def test_the_folder_gets_the_users_permissions(tmp_path):
    before = os.umask(0o022)
    try:
        out = convert(str(variant_dir("g1")), tmp_path / "shared")
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not a temporary folder's owner-only 0o700


@pytest.mark.parametrize("where", ["afile/sub", "missing-root"])
def test_a_place_that_cannot_be_written_is_one_line_naming_it(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / where if where != "missing-root" else Path("/proc/nanochat-out")
    with pytest.raises(NanochatError, match=rf"^{re.escape(str(out))}: cannot write the converted folder there \("):
        convert(str(variant_dir("g1")), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_empty_output_name_is_refused():
    with pytest.raises(NanochatError, match="give the output folder"):
        convert(str(variant_dir("g1")), "")


@pytest.fixture(scope="module")
def small_random():
    """A geometry whose rows split into whole 64-groups (the fixtures' n_embd=48 does not)."""
    config = ModelConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=1, n_kv_head=1, n_embd=128)
    return random_checkpoint(config, arch="g9", seed=3)


@pytest.mark.parametrize("bits,min_agreement", [(8, 0.97), (4, 0.6)])
def test_quantized_reload(tmp_path, small_random, bits, min_agreement):
    plain = convert(small_random, tmp_path / "plain")
    out = convert(str(plain), tmp_path / f"q{bits}", quantize=bits)
    q = json.loads((out / "config.json").read_text())["nanochat_mlx"]["quantization"]
    assert q["bits"] == bits and q["group_size"] == 64
    assert q["quantized_layers"] == 2 * 6 + 3  # 6 linears per layer, wte, lm_head, one value embedding
    names = read_safetensors(out / "model.safetensors")
    assert "lm_head.scales" in names and "transformer.h.0.attn.c_q.biases" in names
    assert names["transformer.h.0.mlp.c_fc.weight"].dtype == np.uint32

    model, tok = nc.load(str(out), dtype="float32")
    direct = build_mlx_model(small_random, dtype="float32", quantize=bits)
    ref = build_mlx_model(small_random, dtype="float32")
    x = mx.array([[tok.get_bos_token_id(), *tok.encode("The quick brown fox jumps over the lazy dog. " * 3)]])
    got = model(x)
    assert np.array_equal(np.array(got), np.array(direct(x)))  # reloading changes nothing
    agreement = float((got.argmax(-1) == ref(x).argmax(-1)).astype(mx.float32).mean())
    assert agreement >= min_agreement
    assert float(mx.abs(got - ref(x)).mean()) < (0.05 if bits == 8 else 0.6)


def test_quantized_fixture_reloads(tmp_path):
    """n_embd=48: only mlp.c_proj (192 inputs) splits into 64-groups; everything else stays plain."""
    out = convert(str(variant_dir("g1")), tmp_path / "q4", quantize=4)
    q = json.loads((out / "config.json").read_text())["nanochat_mlx"]["quantization"]
    assert q["quantized_layers"] == 4
    assert "transformer.h.0.mlp.c_proj.scales" in read_safetensors(out / "model.safetensors")
    model, _ = nc.load(str(out), dtype="float32")
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 400)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_folder_counts_the_parameters_it_quantized(tmp_path, small_random, bits):
    out = convert(small_random, tmp_path / f"q{bits}", quantize=bits)
    assert read_checkpoint(str(out)).n_params == small_random.n_params  # not packed words plus scales


def test_auto_runs_a_quantized_folder_on_mlx_the_one_backend_that_can(tmp_path, small_random):
    out = convert(small_random, tmp_path / "q4", quantize=4)
    loaded = load_model(LoadOptions(str(out), backend="auto"))
    assert loaded.backend == "mlx"
