"""Random-weight checkpoints with nanochat's real geometries (d12, d20, d32, ...) for benchmarks and tests.

Nothing here reads files: ``random_checkpoint("d12", arch="g9")`` builds a ``Checkpoint`` in memory
with seeded random weights (scaled so activations and logits stay in a sane range) and a synthetic
byte-level tiktoken tokenizer with nanochat's special tokens at the top of the vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tiktoken

from .checkpoint import Checkpoint
from .config import ModelConfig, get_spec
from .errors import NanochatError
from .sources import CheckpointFiles
from .tokenizer import NANOCHAT_PATTERN, SPECIAL_TOKENS, Tokenizer
from .weights import Weights, expected_shapes

GEOMETRIES = ("d12", "d20", "d26", "d32")
VOCAB_SIZE = 32768
SEQUENCE_LEN = 2048


def geometry_config(
    geometry: str,
    arch: str = "g9",
    *,
    vocab_size: int = VOCAB_SIZE,
    sequence_len: int = SEQUENCE_LEN,
) -> ModelConfig:
    """nanochat's shapes for depth ``d<N>``: n_embd = 64*N, head_dim 128, MHA, SSSL windows when windowed."""
    m = re.fullmatch(r"d(\d+)", geometry)
    if not m or int(m.group(1)) < 2:
        raise NanochatError(f"unknown geometry {geometry!r} (use d<depth>, e.g. {', '.join(GEOMETRIES)})")
    depth = int(m.group(1))
    n_embd = 64 * depth
    n_head = max(1, n_embd // 128)
    spec = get_spec(arch)
    return ModelConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=n_embd,
        window_pattern="SSSL" if spec.windowed else "L",
        padded_vocab_size=-(-vocab_size // 64) * 64 if spec.name != "g1" else vocab_size,
    )


def synthetic_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` ids: 256 bytes, then two-byte tokens, then the 9 specials."""
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if not 256 <= n_ranks <= 256 + 256 * 256:
        raise NanochatError(f"synthetic tokenizer: vocab_size must be in 265..{256 + 65536 + 9}, got {vocab_size}")
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(n_ranks - 256):
        ranks[bytes([i // 256, i % 256])] = 256 + i
    specials = {tok: n_ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("synthetic", pat_str=NANOCHAT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, f"synthetic byte-level tokenizer ({vocab_size} ids)")


def random_weights(config: ModelConfig, arch: str = "g9", seed: int = 0) -> Weights:
    """Seeded float32 weights of every tensor the generation expects, scaled like a trained net.

    Unlike nanochat's init (zero output projections, lm_head std 0.001), every matrix is non-zero
    so the logits spread (std ~2) and greedy decoding and quantization error are meaningful.
    """
    spec = get_spec(arch)
    rng = np.random.default_rng(seed)
    out: Weights = {}
    for name, shape in expected_shapes(config, spec).items():
        fan_in = shape[-1] if len(shape) == 2 else 1
        if name == "resid_lambdas":
            w = np.ones(shape, np.float32)
        elif name in ("x0_lambdas", "smear_lambda", "backout_lambda"):
            w = np.full(shape, 0.1, np.float32)
        elif name == "transformer.wte.weight" or name.startswith("value_embeds."):
            w = rng.standard_normal(shape, dtype=np.float32)
        elif name == "lm_head.weight":
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(2.0 / np.sqrt(fan_in))
        elif name.endswith("c_proj.weight"):
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.5 / np.sqrt(fan_in))
        elif name.endswith(("ve_gate.weight", "smear_gate.weight")):
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
        else:  # c_q, c_k, c_v, c_fc: nanochat's uniform(+-sqrt(3/fan_in))
            bound = np.float32(np.sqrt(3.0 / fan_in))
            w = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        out[name] = w
    return out


def random_checkpoint(
    geometry: str | ModelConfig = "d12",
    arch: str = "g9",
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> Checkpoint:
    """An in-memory ``Checkpoint`` of ``geometry`` (``"d12"`` or a ``ModelConfig``) with random weights."""
    spec = get_spec(arch)
    config = geometry if isinstance(geometry, ModelConfig) else geometry_config(geometry, spec.name)
    label = geometry if isinstance(geometry, str) else f"n_layer={config.n_layer},n_embd={config.n_embd}"
    tokenizer = tokenizer or synthetic_tokenizer(config.vocab_size)
    if tokenizer.vocab_size != config.vocab_size:
        raise NanochatError(f"tokenizer has {tokenizer.vocab_size} ids, geometry needs {config.vocab_size}")
    files = CheckpointFiles(
        origin=f"random:{label}:{spec.name}",
        layout="synthetic",
        weights=[],
        tokenizer=Path("<synthetic>"),
    )
    weights = random_weights(config, spec.name, seed)
    how = f"random weights (seed {seed}) with {label} geometry"
    return Checkpoint(files, config, spec, how, weights, tokenizer, meta={"model_config": config.to_dict()})
