"""A fresh, untrained g9 checkpoint folder initialised as the reference's ``GPT.init_weights`` (HEAD).

wte normal(0.8); lm_head normal(0.001); c_q/c_k/c_v uniform(+-sqrt(3/n_embd)), c_fc 0.4x that;
attention and MLP output projections zero; resid_lambdas 1.15 -> 1.05 and x0_lambdas 0.20 -> 0.05
over depth; smear_lambda 0, backout_lambda 0.2; smear and value-embedding gates uniform(0, 0.02);
value embeddings like c_v. The meta carries the training geometry ``nanochat-mlx sft`` inherits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nanochat_mlx.config import ModelConfig, get_spec
from nanochat_mlx.tokenizer import Tokenizer
from nanochat_mlx.training.checkpoints import write_pt, write_tokenizer
from nanochat_mlx.weights import Weights, expected_shapes


def init_weights(config: ModelConfig, seed: int = 0) -> Weights:
    """Every tensor of a g9 model of ``config``, initialised as the reference does (float32)."""
    rng = np.random.default_rng(seed)
    s = np.sqrt(3.0) * config.n_embd**-0.5  # uniform bound with the std of normal(1/sqrt(n_embd))
    n = config.n_layer
    depth = np.arange(n, dtype=np.float32) / max(n - 1, 1)

    def uniform(shape, low, high):
        return rng.uniform(low, high, size=shape).astype(np.float32)

    out: Weights = {}
    for name, shape in expected_shapes(config, get_spec("g9")).items():
        if name == "transformer.wte.weight":
            w = rng.normal(0.0, 0.8, size=shape).astype(np.float32)
        elif name == "lm_head.weight":
            w = rng.normal(0.0, 0.001, size=shape).astype(np.float32)
        elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")) or name == "smear_lambda":
            w = np.zeros(shape, np.float32)
        elif name.endswith("mlp.c_fc.weight"):
            w = uniform(shape, -0.4 * s, 0.4 * s)
        elif name.endswith(("ve_gate.weight", "smear_gate.weight")):
            w = uniform(shape, 0.0, 0.02)
        elif name == "resid_lambdas":
            w = (1.15 - 0.10 * depth).astype(np.float32)
        elif name == "x0_lambdas":
            w = (0.20 - 0.15 * depth).astype(np.float32)
        elif name == "backout_lambda":
            w = np.full(shape, 0.2, np.float32)
        else:  # c_q, c_k, c_v and the value embeddings
            w = uniform(shape, -s, s)
        out[name] = w
    return out


def write_initial_checkpoint(
    out: Path, config: ModelConfig, tokenizer: Tokenizer, training: dict, seed: int = 0
) -> Path:
    """``out/model_000000.pt``, ``meta_000000.json`` and ``tokenizer/``; ``training`` goes into the meta."""
    out.mkdir(parents=True, exist_ok=True)
    write_pt(out / "model_000000.pt", init_weights(config, seed))
    model_config = {k: v for k, v in config.to_dict().items() if k != "padded_vocab_size"}
    meta = {"step": 0, "model_config": model_config, **training}
    (out / "meta_000000.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(out / "tokenizer", tokenizer)
    return out
