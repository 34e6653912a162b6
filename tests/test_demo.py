"""The built-in demo model (``--source demo``) and the recipe that regenerates it."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from benchmarks.demo import conversations as conv
from benchmarks.demo.init import init_weights, write_initial_checkpoint
from nanochat_mlx.config import ModelConfig, get_spec
from nanochat_mlx.demo import MODEL_DIR
from nanochat_mlx.sources import resolve
from nanochat_mlx.tokenizer import SPECIAL_TOKENS
from nanochat_mlx.weights import expected_shapes


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_MLX_CONFIG_DIR": str(tmp_path / "config")}
    cmd = [sys.executable, "-m", "nanochat_mlx.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


# --- the shipped model ----------------------------------------------------------------------------


def test_demo_source_resolves_to_the_package_files() -> None:
    files = resolve("demo")
    assert files.origin == "demo" and files.layout == "native"
    assert files.folder == MODEL_DIR and files.tokenizer == MODEL_DIR / "tokenizer" / "tokenizer.pkl"


def test_demo_is_small_enough_for_the_wheel() -> None:
    assert sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file()) <= 20 * 2**20


def test_demo_answers_arithmetic_through_the_calculator(tmp_path: Path) -> None:
    out = cli("-p", "What is 123*45?", "-t", "0", "--source", "demo", "--backend", "mlx", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "<|python_start|>123*45<|python_end|><|output_start|>5535<|output_end|>" in out.stdout
    assert "5535" in out.stdout.rsplit("<|output_end|>", 1)[1]


def test_info_describes_the_demo(tmp_path: Path) -> None:
    out = cli("info", "demo", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "g9" in out.stdout and "built-in demo model" in out.stdout
    assert "bits per byte" in out.stdout and "held-out" in out.stdout


# --- the recipe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_arithmetic_conversation_calls_the_tool_with_the_true_result(seed: int) -> None:
    c = conv.arithmetic(random.Random(seed))
    expr, output, answer = (p["text"] for p in c["messages"][1]["content"])
    a, op, b = next(expr.partition(o) for o in "+-*/" if o in expr)
    true = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
    assert output == str(true) and output in answer
    assert len(b) <= 4 and len(a) <= (5 if op == "/" else 4)  # exact divisions: b x (1..999)
    assert a in c["messages"][0]["content"] and b in c["messages"][0]["content"]


def test_conversations_render_with_the_tool_parts_masked_as_the_reference() -> None:
    from nanochat_mlx.synthetic import synthetic_tokenizer

    tok = synthetic_tokenizer(2048)
    ids, mask = tok.render_conversation(conv.arithmetic(random.Random(0)))
    start, end = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
    i, j = ids.index(start), ids.index(end)
    assert set(mask[i : j + 1]) == {0} and mask[ids.index(tok.encode_special("<|python_start|>"))] == 1


def test_letter_counting_uses_the_calculator() -> None:
    rng = random.Random(3)
    counted = [
        c
        for c in (conv.spelling(rng, ["strawberry"]) for _ in range(20))
        if isinstance(c["messages"][1]["content"], list)
    ]
    assert counted
    for c in counted:
        parts = c["messages"][1]["content"]
        letter = parts[1]["text"].split("'")[3]
        assert parts[2]["text"] == str("strawberry".count(letter))


def test_chitchat_window_alternates_user_and_assistant() -> None:
    turns = [f"turn {i}" for i in range(9)]
    c = conv.chitchat(turns, random.Random(1))
    roles = [m["role"] for m in c["messages"]]
    assert roles and roles == ["user", "assistant"] * (len(roles) // 2)


def test_init_follows_the_reference_scheme() -> None:
    config = ModelConfig(sequence_len=256, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=128,
                         window_pattern="SSSL")  # fmt: skip
    w = init_weights(config)
    assert {k: v.shape for k, v in w.items()} == expected_shapes(config, get_spec("g9"))
    assert not w["transformer.h.0.attn.c_proj.weight"].any() and not w["transformer.h.3.mlp.c_proj.weight"].any()
    np.testing.assert_allclose(w["resid_lambdas"], [1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05], rtol=1e-6)
    np.testing.assert_allclose(w["x0_lambdas"], [0.20, 0.15, 0.10, 0.05], rtol=1e-6)
    assert abs(float(w["transformer.wte.weight"].std()) - 0.8) < 0.02
    assert abs(float(w["lm_head.weight"].std()) - 0.001) < 1e-4
    bound = np.sqrt(3 / 128)
    assert np.abs(w["transformer.h.1.attn.c_q.weight"]).max() <= bound
    assert np.abs(w["transformer.h.1.mlp.c_fc.weight"]).max() <= 0.4 * bound


def test_tokenizer_training_and_initial_checkpoint_load(tmp_path: Path) -> None:
    pytest.importorskip("rustbpe")
    from benchmarks.demo.tokenizer import train_tokenizer
    from nanochat_mlx.loading import load_model
    from nanochat_mlx.options import LoadOptions

    rng = random.Random(0)
    texts = [conv.arithmetic(rng)["messages"][0]["content"] for _ in range(200)] + conv.IDENTITY_QUESTIONS
    tok = train_tokenizer(iter(texts), 320)
    assert tok.vocab_size == 320
    assert [tok.encode_special(t) for t in SPECIAL_TOKENS] == list(range(311, 320))
    question = "What is your name?"  # one of the training texts: merges shorten it
    assert tok.decode(tok.encode(question)) == question and len(tok.encode(question)) < len(question)
    config = ModelConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=1, n_kv_head=1, n_embd=64,
                         window_pattern="SSSL", padded_vocab_size=320)  # fmt: skip
    folder = write_initial_checkpoint(tmp_path / "init", config, tok, {"max_seq_len": 64})
    loaded = load_model(LoadOptions(str(folder), backend="mlx"))
    assert loaded.generation == "g9" and loaded.tokenizer.vocab_size == 320
