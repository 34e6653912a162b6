"""nanochat_mlx.bench, the roofline byte accounting and nanochat_mlx.synthetic."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import variant_dir
from make_training_expected import COMMITS, MIRROR

from nanochat_mlx import bench
from nanochat_mlx.backends.mlx.model import build_mlx_model
from nanochat_mlx.checkpoint import read_checkpoint
from nanochat_mlx.synthetic import geometry_config, random_checkpoint, synthetic_tokenizer
from nanochat_mlx.weights import expected_shapes


def reference_tree(generation: str, dest: Path) -> Path:
    """The reference's source at ``generation``'s snapshot commit, extracted from the mirror."""
    if not MIRROR.is_dir() or shutil.which("git") is None:
        pytest.skip(f"no karpathy/nanochat mirror at {MIRROR}: the reference comparison cannot run here")
    pytest.importorskip("torch")
    for module in ("rustbpe", "tiktoken", "filelock"):  # what the reference's inference modules import
        pytest.importorskip(module)
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(MIRROR), "archive", COMMITS[generation]], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def test_quick_runs(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--geometry", "d2", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["rows"]
    assert set(bench.ROW_KEYS) <= row.keys()
    assert row["prefill_tps"] > 0 and row["decode_tps"] > 0 and row["own_decode_tps"] > 0 and row["ttft_s"] > 0
    assert row["weight_bytes"] > 0 and row["roofline_decode_tps"] > 0 and row["trials"] == 1
    assert {"cpu", "cores", "threads", "bandwidth_gbps", "mlx", "numpy"} <= payload["machine"].keys()
    assert payload["chat_turns"][0]["ttft_with_cache_s"] > 0
    printed = capsys.readouterr().out
    assert "read bandwidth" in printed and "| nanochat-mlx |" in printed


def test_compare_mlx_lm_ratios_first(tmp_path):
    md = tmp_path / "rows.md"
    args = ["--source", str(variant_dir("g1")), "--prompt-tokens", "8,16", "--decode-tokens", "4", "--trials", "1",
            "--compare", "mlx-lm", "--chat-turns", "0", "--markdown", str(md)]  # fmt: skip
    assert bench.main(args) == 0
    lines = md.read_text().splitlines()
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[first_table].startswith("| ratio") and "CPU:" in md.read_text()
    assert sum(line.startswith("| nanochat-mlx (mlx) / mlx-lm (mlx)") for line in lines) == 2


def test_compare_reference_from_a_native_source(tmp_path):
    """The reference's own code, on the fixture folder itself, computes our greedy tokens."""
    repo = reference_tree("g1", tmp_path / "nanochat")
    out = tmp_path / "rows.json"
    args = ["--source", str(variant_dir("g1")), "--backend", "torch", "--compare", "reference", "--reference-repo",
            str(repo), "--prompt-tokens", "8,24", "--decode-tokens", "4", "--trials", "1", "--chat-turns", "0",
            "--json", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    payload = json.loads(out.read_text())
    assert payload["machine"]["reference_repo"] == str(repo) and "reference_commit" in payload["machine"]
    rows = {(r["impl"], r["prompt_tokens"]): r for r in payload["rows"]}
    assert set(rows) == {(impl, n) for impl in ("nanochat-mlx", "reference") for n in (8, 24)}
    for n in (8, 24):
        assert rows["nanochat-mlx", n]["greedy_match"] == 1.0
        assert rows["nanochat-mlx", n]["tokens"] == rows["reference", n]["tokens"]
        assert rows["reference", n]["decode_tps"] > 0 and rows["reference", n]["own_decode_tps"] is None


def test_compare_reference_writes_a_native_checkpoint(tmp_path):
    """An in-memory (random geometry) checkpoint is written as a native folder both sides load."""
    repo = reference_tree("g9", tmp_path / "nanochat")
    ckpt = random_checkpoint(geometry_config("d2", "g9", vocab_size=1024, sequence_len=64), arch="g9", seed=3)
    rows = bench.run_benchmark(
        ckpt, geometry="d2", backends=("torch",), compare=("reference",), reference_repo=repo, prompt_lengths=(8,),
        decode_tokens=4, trials=1, log=lambda s: None,
    )  # fmt: skip
    ours, ref = sorted(rows, key=lambda r: r.impl)
    assert (ours.impl, ref.impl) == ("nanochat-mlx", "reference")
    assert ours.tokens == ref.tokens and ours.greedy_match == 1.0


def test_compare_reference_needs_a_checkout(tmp_path, capsys):
    assert bench.main(["--geometry", "d2", "--compare", "reference"]) == 1
    assert "--reference-repo" in capsys.readouterr().err
    assert bench.main(["--geometry", "d2", "--compare", "reference", "--reference-repo", str(tmp_path)]) == 1
    assert "not a nanochat checkout" in capsys.readouterr().err


def test_quantized_rows_report_quality():
    ckpt = random_checkpoint(
        geometry_config("d2", "g9", vocab_size=1024, sequence_len=64), arch="g9", seed=1
    )  # n_embd 128: quantizable
    rows = bench.run_benchmark(
        ckpt, geometry="d2", quantize=(None, 8), prompt_lengths=(8,), decode_tokens=3, trials=1, log=lambda s: None
    )
    assert sorted(r.quantize or 0 for r in rows) == [0, 8]
    q = next(r for r in rows if r.quantize == 8)
    assert q.quality is not None and 0.9 <= q.quality["greedy_agreement"] <= 1.0 and q.quality["mean_abs_dlogit"] > 0
    assert q.roofline_decode_tps is None  # the byte accounting covers unquantized weights only


def test_byte_accounting_by_hand():
    """The fixture geometry (4 layers, n_embd 48, 4 heads / 2 KV heads of 12, vocab 400 padded to 448)."""
    g9 = read_checkpoint(str(variant_dir("g9")))
    c, spec = g9.config, g9.spec
    embed = 448 * 48  # wte and lm_head each
    layer = 48 * 48 + 24 * 48 + 24 * 48 + 48 * 48 + 192 * 48 + 48 * 192  # c_q c_k c_v c_proj c_fc mlp.c_proj
    ve = 448 * 24  # value embedding table, on layers 1 and 3, each with a 2x12 ve_gate
    scalars = 4 + 4 + 24 + 1 + 1  # resid/x0 lambdas, smear_gate, smear_lambda, backout_lambda
    total = 2 * embed + 4 * layer + 2 * (ve + 2 * 12) + scalars
    assert c.weight_bytes(spec) == 4 * total == 4 * g9.n_params
    assert c.weight_bytes(spec, itemsize=2) == 2 * total
    read = total - (embed - 48) - 2 * (ve - 24)  # one row of wte and of each value-embedding table
    assert c.decode_weight_bytes(spec) == 4 * read
    per_position = 2 * 2 * 12 * 4  # K and V, 2 KV heads of 12, float32
    # windows (128, 128, 64, 64): a layer with window w reads at most w + 1 positions
    assert c.kv_read_bytes(spec, 100) == (100 + 100 + 65 + 65) * per_position
    assert c.kv_read_bytes(spec, 10, itemsize=2) == 4 * 10 * per_position // 2
    g1 = read_checkpoint(str(variant_dir("g1")))  # no windows: every layer reads the whole context
    assert g1.config.kv_read_bytes(g1.spec, 1000) == 4 * 1000 * per_position


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


def test_serve_benchmark_drives_the_real_server_and_writes_its_rows(tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run(
        [sys.executable, "-m", "nanochat_mlx.cli", "bench", "--serve", "--geometry", "d2", "--backend", "torch"
         if importlib.util.find_spec("torch") else "mlx", "--concurrency", "1,2", "--decode-tokens", "4",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["concurrency"] for row in rows] == [1, 2]
    for row in rows:
        assert row["impl"] == "nanochat-mlx-serve" and row["errors"] == 0 and row["requests"] > 0
        assert row["aggregate_decode_tps"] > 0 and row["ttft_p95_s"] >= row["ttft_p50_s"] > 0
