"""nanochat_mlx.bench and nanochat_mlx.synthetic: smallest runs, JSON rows, random geometries."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from conftest import variant_dir

from nanochat_mlx import bench
from nanochat_mlx.backends.mlx.model import build_mlx_model
from nanochat_mlx.synthetic import geometry_config, random_checkpoint, synthetic_tokenizer
from nanochat_mlx.weights import expected_shapes


def test_bench_smallest_run_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    md = tmp_path / "rows.md"
    args = ["--source", str(variant_dir("g1")), "--prompt-tokens", "8,16", "--decode-tokens", "4", "--trials", "1",
            "--compare", "mlx-lm", "--json", str(out), "--markdown", str(md)]  # fmt: skip
    assert bench.main(args) == 0
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert {r["impl"] for r in rows} == {"nanochat-mlx", "mlx-lm"}
    assert len(rows) == 4
    for r in rows:
        assert set(bench.ROW_KEYS) <= r.keys()
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["ttft_s"] > 0
        assert r["weight_bytes"] > 0 and r["roofline_decode_tps"] > 0 and r["trials"] == 1
    assert "cores" in payload["machine"] and "mlx" in payload["machine"]
    assert "ratio" in md.read_text() and "| nanochat-mlx |" in capsys.readouterr().out


def test_bench_reference_and_quantized(tmp_path):
    pytest.importorskip("torch")
    ckpt = random_checkpoint(
        geometry_config("d2", "g9", vocab_size=1024, sequence_len=64), arch="g9", seed=1
    )  # n_embd 128: quantizable
    rows = bench.run_benchmark(
        ckpt, geometry="d2", quantize=(None, 8), compare=("reference", "mlx-lm"), prompt_lengths=(8,),
        decode_tokens=3, trials=1, log=lambda s: None,
    )  # fmt: skip
    impls = sorted((r.impl, r.quantize or 0) for r in rows)
    assert impls == [("nanochat-mlx", 0), ("nanochat-mlx", 8), ("reference", 0)]  # mlx-lm: g1 math only
    q = next(r for r in rows if r.quantize == 8).quality
    assert q is not None and 0.9 <= q["greedy_agreement"] <= 1.0 and q["mean_abs_dlogit"] > 0


def test_reference_port_matches_fixture_greedy():
    """The reference port is a faithful baseline: greedy tokens equal our model's on a fixture."""
    pytest.importorskip("torch")
    from nanochat_mlx.checkpoint import read_checkpoint
    from nanochat_mlx.engine import Engine
    from nanochat_mlx.sampling import SamplingParams

    for variant in ("g1", "g9"):
        ckpt = read_checkpoint(str(variant_dir(variant)))
        ref = bench.ReferenceGPT(ckpt)
        prompt = [ckpt.tokenizer.get_bos_token_id(), *ckpt.tokenizer.encode("hello there")]
        expected = [c[0] for c in ref.generate(prompt, max_tokens=10, temperature=0.0)]
        engine = Engine(build_mlx_model(ckpt, dtype="float32"), ckpt.tokenizer)
        engine.stop_ids = set()
        got = [t for ev in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10)) for t in ev.tokens]
        assert got == expected


@pytest.mark.parametrize("geometry,n_embd,n_head", [("d12", 768, 6), ("d20", 1280, 10), ("d32", 2048, 16)])
def test_geometry_shapes(geometry, n_embd, n_head):
    c = geometry_config(geometry, "g9")
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (int(geometry[1:]), n_embd, n_head, n_head, 128)
    assert (c.vocab_size, c.sequence_len, c.window_pattern) == (32768, 2048, "SSSL")
    assert geometry_config(geometry, "g1").window_pattern == "L"


def test_random_checkpoint_builds_and_has_sane_logits():
    config = geometry_config("d2", "g9", vocab_size=512, sequence_len=64)
    ckpt = random_checkpoint(config, arch="g9", seed=0)
    assert set(ckpt.weights) == set(expected_shapes(config, ckpt.spec))
    assert all(ckpt.weights[k].shape == s for k, s in expected_shapes(config, ckpt.spec).items())
    again = random_checkpoint(config, arch="g9", seed=0)
    assert all((again.weights[k] == w).all() for k, w in ckpt.weights.items())
    model = build_mlx_model(ckpt, dtype="float32")
    logits = model(mx.array([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, 512)
    std = float(mx.std(logits))
    assert 0.3 < std < 10


def test_synthetic_tokenizer():
    tok = synthetic_tokenizer(1000)
    assert tok.vocab_size == 1000
    assert tok.get_bos_token_id() == 991
    assert tok.decode(tok.encode("héllo")) == "héllo"


def test_bad_options():
    assert bench.main(["--geometry", "d12", "--dtype", "float64"]) == 1
    assert bench.main(["--geometry", "x7"]) == 1
