"""``nanochat-mlx bench``: load time, TTFT, prefill and decode speed, memory, roofline, comparisons.

Implementations measured on identical weights, in one process, trials interleaved:
  * ``nanochat-mlx``: our model driven by our ``Engine`` (the product path), MLX or torch backend;
  * ``mlx-lm``: ``mlx_lm.models.nanochat.Model`` driven by ``mlx_lm.generate.generate_step``
    (g1 math only, so only for g1/g2 checkpoints and geometries);
  * ``reference``: a faithful minimal PyTorch port of nanochat's GPT forward, KVCache (with its
    SDPA fallback) and ``Engine.generate`` loop (``ReferenceGPT`` below): a measurement baseline.
Greedy decoding everywhere; stop tokens are ignored so every run decodes the same number of tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import build_model
from .checkpoint import Checkpoint, read_checkpoint
from .config import ArchSpec, ModelConfig
from .errors import NanochatError

IMPLS = ("nanochat-mlx", "mlx-lm", "reference")
ROW_KEYS = (
    "impl", "backend", "device", "dtype", "quantize", "geometry", "prompt_tokens", "context", "prefill_tps",
    "decode_tps", "ttft_s", "peak_memory_bytes", "weight_bytes", "bandwidth_gbps", "roofline_decode_tps", "trials",
)  # fmt: skip
QUALITY_TEXT = (
    "The sky is blue because molecules in the air scatter short wavelengths of sunlight more than long ones. "
    "User: what is 12 * 7? Assistant: 12 * 7 = 84. Photosynthesis converts light, water and carbon dioxide "
    "into sugar and oxygen; the Krebs cycle then releases energy stored in those sugars. "
)


@dataclass
class Row:
    """One measured configuration at one prompt length (medians over ``trials``)."""

    impl: str
    backend: str
    device: str
    dtype: str
    quantize: int | None
    geometry: str
    prompt_tokens: int
    context: int  # mean context length while decoding
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    peak_memory_bytes: int | None
    weight_bytes: int
    bandwidth_gbps: float
    roofline_decode_tps: float
    trials: int
    arch: str = ""
    decode_tokens: int = 0
    prefill_tps_range: tuple[float, float] = (0.0, 0.0)
    decode_tps_range: tuple[float, float] = (0.0, 0.0)
    load_cold_s: float | None = None
    load_warm_s: float | None = None
    quality: dict[str, float] | None = None

    @property
    def roofline_fraction(self) -> float:
        return self.decode_tps / self.roofline_decode_tps if self.roofline_decode_tps else 0.0


@dataclass
class Trial:
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    peak_memory_bytes: int | None


# --- implementations -------------------------------------------------------------------------------


@dataclass
class Contender:
    """One implementation loaded with one dtype/quantization, ready to generate."""

    impl: str
    backend: str
    device: str
    dtype: str
    quantize: int | None
    run: Callable[[list[int], int], Trial]
    weight_bytes: int
    active_bytes: int  # bytes of weights read per decoded token (embedding tables are gathers)
    kv_bytes_per_position: Callable[[int], int]  # KV bytes read per token at a context length
    load_cold_s: float
    load_warm_s: float
    model: Any = None
    results: dict[int, list[Trial]] = field(default_factory=dict)


def _kv_reader(config: ModelConfig, spec: ArchSpec, itemsize: int) -> Callable[[int], int]:
    windows = config.window_sizes(spec)
    per_pos = 2 * config.n_kv_head * config.head_dim * itemsize

    def kv_bytes(context: int) -> int:
        return sum(min(context, (w + 1) if w is not None else context) for w in windows) * per_pos

    return kv_bytes


def _mlx_param_bytes(model: Any) -> tuple[int, int]:
    from mlx.utils import tree_flatten

    total = active = 0
    for name, p in tree_flatten(model.parameters()):
        total += p.nbytes
        if not (name.startswith("transformer.wte.") or name.startswith("value_embeds.")):
            active += p.nbytes
    return total, active


def _active_memory(backend: str) -> int | None:
    """MLX memory held right now (all models in the process); None where not tracked."""
    if backend != "mlx":
        return None
    import mlx.core as mx

    return int(mx.get_active_memory())


def _timed(build: Callable[[], Any]) -> tuple[Any, float, float]:
    """Build twice (first = cold, second = warm); keep the second."""
    t0 = time.perf_counter()
    build()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = build()
    return model, cold, time.perf_counter() - t0


def ours(ckpt: Checkpoint, backend: str, dtype: str, quantize: int | None, source: str | None) -> Contender:
    """nanochat-mlx: load (from ``source`` when given, else from the in-memory checkpoint) + Engine."""
    from .engine import Engine
    from .loading import load
    from .sampling import SamplingParams

    def build() -> Any:
        if source is not None:
            return load(source, arch=ckpt.spec.name, dtype=dtype, quantize=quantize, backend=backend)[0]
        return build_model(ckpt, dtype=dtype, quantize=quantize, backend=backend)

    model, cold, warm = _timed(build)
    engine = Engine(model, ckpt.tokenizer)
    engine.stop_ids = set()  # random weights: decode a fixed number of tokens

    def run(prompt: list[int], n: int) -> Trial:
        stats = None
        base = _active_memory(backend)
        for ev in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n, seed=0)):
            stats = ev.stats or stats
        assert stats is not None and stats.generated_tokens == n, stats
        peak = stats.peak_memory_bytes
        if peak and base is not None:  # other models share the process: count this one's weights only
            peak = peak - base + total
        return Trial(stats.ttft_s, stats.prefill_tps, stats.decode_tps, peak)

    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    if backend == "mlx":
        total, active = _mlx_param_bytes(model)
    else:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        active = total - sum(
            p.numel() * p.element_size()
            for n, p in model.named_parameters()
            if n.startswith(("transformer.wte.", "value_embeds."))
        )
    return Contender(
        "nanochat-mlx", backend, engine.runner.device, dtype, quantize, run, total, active,
        _kv_reader(ckpt.config, ckpt.spec, itemsize), cold, warm, model,
    )  # fmt: skip


def mlx_lm_contender(ckpt: Checkpoint, dtype: str, quantize: int | None) -> Contender:
    """mlx-lm's own nanochat model (g1 math) with our weights, driven by ``generate_step``."""
    import importlib

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.nanochat import Model, ModelArgs

    from .backends.mlx.model import MLX_DTYPES, QUANT_GROUP, quantizable, to_mlx

    generate_step = importlib.import_module("mlx_lm.generate").generate_step
    c = ckpt.config
    args = ModelArgs(
        hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, vocab_size=c.vocab_size, max_position_embeddings=c.sequence_len,
        intermediate_size=4 * c.n_embd, rope_theta=ckpt.spec.rope_base,
    )  # fmt: skip

    def build() -> Any:
        model = Model(args)
        weights = []
        for name, a in ckpt.weights.items():
            if name in ("transformer.wte.weight", "lm_head.weight"):
                a = a[: c.vocab_size]  # mlx-lm has no padded-vocab support
            weights.append((name, to_mlx(a).astype(MLX_DTYPES[dtype])))
        model.load_weights(weights, strict=True)
        if quantize:
            nn.quantize(model, group_size=QUANT_GROUP, bits=quantize, class_predicate=quantizable)
        mx.eval(model.parameters())
        return model

    model, cold, warm = _timed(build)

    def run(prompt: list[int], n: int) -> Trial:
        base = int(mx.get_active_memory())
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        first = None
        count = 0
        sampler = lambda logprobs: mx.argmax(logprobs, axis=-1)
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=sampler):
            int(token)
            count += 1
            first = first or time.perf_counter()
        end = time.perf_counter()
        assert count == n
        ttft = first - t0
        peak = int(mx.get_peak_memory()) - base + total  # this model's weights + what the run allocated
        return Trial(ttft, len(prompt) / ttft, (n - 1) / (end - first) if n > 1 else 0.0, peak)

    total, active = _mlx_param_bytes(model)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return Contender(
        "mlx-lm", "mlx", "gpu (Metal)" if mx.default_device() == mx.gpu else "cpu", dtype, quantize, run,
        total, active, _kv_reader(c, ckpt.spec, itemsize), cold, warm, model,
    )  # fmt: skip


def reference_contender(ckpt: Checkpoint, dtype: str) -> Contender:
    """The PyTorch port of the reference engine (``ReferenceGPT``) on the same weights."""
    import torch

    def build() -> Any:
        return ReferenceGPT(ckpt, dtype)

    model, cold, warm = _timed(build)

    def run(prompt: list[int], n: int) -> Trial:
        t0 = time.perf_counter()
        first = None
        count = 0
        for _ in model.generate(prompt, max_tokens=n, temperature=0.0):
            count += 1
            first = first or time.perf_counter()
        end = time.perf_counter()
        assert count == n
        ttft = first - t0
        return Trial(ttft, len(prompt) / ttft, (n - 1) / (end - first) if n > 1 else 0.0, None)

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embeds = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if name.startswith(("transformer.wte.", "value_embeds."))
    )
    device = f"cpu (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return Contender(
        "reference", "torch", device, dtype, None, run, total, total - embeds,
        _kv_reader(ckpt.config, ckpt.spec, itemsize), cold, warm, model,
    )  # fmt: skip


# --- the reference, ported to plain PyTorch (a baseline, not product code) --------------------------


def ReferenceGPT(ckpt: Checkpoint, dtype: str = "float32") -> Any:  # noqa: N802 (class factory: torch is lazy)
    """nanochat's GPT + KVCache + Engine.generate as the reference writes them (HEAD-style cache).

    Naive on purpose, as the reference: full-vocabulary logits for every prefill position, a
    preallocated (B, T, H, D) cache written in place, SDPA with explicit masks, per-step
    ``.tolist()`` and ``torch.tensor`` round trips, sampling with a torch Generator.
    """
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F  # noqa: N812

    from .rope import rotary_tables

    cfg, spec = ckpt.config, ckpt.spec
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    def norm(x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),))

    def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d = x.shape[3] // 2
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)

    def sdpa(q, k, v, window: int, gqa: bool) -> torch.Tensor:  # the reference's SDPA fallback
        tq, tk = q.size(2), k.size(2)
        if (window < 0 or window >= tq) and tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if tq == 1:
            if 0 <= window < tk:
                start = max(0, tk - (window + 1))
                k, v = k[:, :, start:], v[:, :, start:]
            return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        row = (tk - tq) + torch.arange(tq).unsqueeze(1)
        col = torch.arange(tk).unsqueeze(0)
        mask = col <= row
        if 0 <= window < tk:
            mask = mask & ((row - col) <= window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    class KVCache:
        def __init__(self, batch: int, seq_len: int) -> None:
            shape = (cfg.n_layer, batch, seq_len, cfg.n_kv_head, cfg.head_dim)
            self.k_cache = torch.zeros(shape, dtype=tdtype)
            self.v_cache = torch.zeros(shape, dtype=tdtype)
            self.cache_seqlens = torch.zeros(batch, dtype=torch.int32)
            self.prev_embedding = None

        def get_pos(self) -> int:
            return int(self.cache_seqlens[0].item())

        def prefill(self, other: KVCache) -> None:
            pos = other.get_pos()
            self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
            self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
            self.cache_seqlens.fill_(pos)
            if other.prev_embedding is not None:
                self.prev_embedding = other.prev_embedding.expand(self.k_cache.size(1), -1, -1).clone()

    ve_layers = set(cfg.ve_layers(spec))

    class Attention(tnn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.i = i
            e, h, kv, d = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
            self.c_q = tnn.Linear(e, h * d, bias=False)
            self.c_k = tnn.Linear(e, kv * d, bias=False)
            self.c_v = tnn.Linear(e, kv * d, bias=False)
            self.c_proj = tnn.Linear(e, e, bias=False)
            self.ve_gate = tnn.Linear(spec.ve_gate_channels, kv, bias=False) if i in ve_layers else None

        def forward(self, x, ve, cos, sin, window, cache):
            b, t, _ = x.shape
            q = self.c_q(x).view(b, t, cfg.n_head, cfg.head_dim)
            k = self.c_k(x).view(b, t, cfg.n_kv_head, cfg.head_dim)
            v = self.c_v(x).view(b, t, cfg.n_kv_head, cfg.head_dim)
            if ve is not None:
                ve = ve.view(b, t, cfg.n_kv_head, cfg.head_dim)
                gate = spec.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., : spec.ve_gate_channels]))
                v = v + gate.unsqueeze(-1) * ve
            q, k = norm(rotary(q, cos, sin)), norm(rotary(k, cos, sin))
            if spec.qk_scale != 1.0:
                q, k = q * spec.qk_scale, k * spec.qk_scale
            gqa = cfg.n_head != cfg.n_kv_head
            if cache is None:
                y = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, gqa)
            else:
                pos = cache.get_pos()
                cache.k_cache[self.i, :, pos : pos + t] = k
                cache.v_cache[self.i, :, pos : pos + t] = v
                kf = cache.k_cache[self.i, :, : pos + t]
                vf = cache.v_cache[self.i, :, : pos + t]
                y = sdpa(q.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), window, gqa)
                if self.i == cfg.n_layer - 1:
                    cache.cache_seqlens += t
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, -1))

    class Block(tnn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.attn = Attention(i)
            self.mlp = tnn.ModuleDict(
                {"c_fc": tnn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False),
                 "c_proj": tnn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)}
            )  # fmt: skip

        def forward(self, x, ve, cos, sin, window, cache):
            x = x + self.attn(norm(x), ve, cos, sin, window, cache)
            return x + self.mlp["c_proj"](F.relu(self.mlp["c_fc"](norm(x))).square())

    class GPT(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            vp = cfg.padded_vocab_size
            self.transformer = tnn.ModuleDict(
                {"wte": tnn.Embedding(vp, cfg.n_embd), "h": tnn.ModuleList([Block(i) for i in range(cfg.n_layer)])}
            )
            self.lm_head = tnn.Linear(cfg.n_embd, vp, bias=False)
            kv_dim = cfg.n_kv_head * cfg.head_dim
            self.value_embeds = tnn.ModuleDict({str(i): tnn.Embedding(vp, kv_dim) for i in sorted(ve_layers)})
            if spec.lambdas:
                self.resid_lambdas = tnn.Parameter(torch.ones(cfg.n_layer))
                self.x0_lambdas = tnn.Parameter(torch.zeros(cfg.n_layer))
            if spec.smear:
                self.smear_gate = tnn.Linear(spec.smear_channels, 1, bias=False)
                self.smear_lambda = tnn.Parameter(torch.zeros(1))
            if spec.backout:
                self.backout_lambda = tnn.Parameter(torch.zeros(1))
            cos, sin = rotary_tables(cfg.head_dim, cfg.rope_len, spec.rope_base, spec.rope_table_bf16)
            table = torch.bfloat16 if spec.rope_table_bf16 else tdtype
            self.register_buffer("cos", torch.from_numpy(cos).to(table)[None, :, None, :], persistent=False)
            self.register_buffer("sin", torch.from_numpy(sin).to(table)[None, :, None, :], persistent=False)
            self.windows = [w if w is not None else -1 for w in cfg.window_sizes(spec)]

        def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
            b, t = idx.size()
            t0 = 0 if kv_cache is None else kv_cache.get_pos()
            cos, sin = self.cos[:, t0 : t0 + t], self.sin[:, t0 : t0 + t]
            x = norm(self.transformer["wte"](idx).to(tdtype))
            if spec.smear:
                gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., : spec.smear_channels]))
                if kv_cache is not None and t == 1:
                    prev = kv_cache.prev_embedding
                    kv_cache.prev_embedding = x[:, -1:].clone()
                    if prev is not None:
                        x = x + gate * prev
                else:
                    if kv_cache is not None:
                        kv_cache.prev_embedding = x[:, -1:].clone()
                    x = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
            x0 = x
            x_mid = None
            for i, block in enumerate(self.transformer["h"]):
                if spec.lambdas:
                    x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
                x = block(x, ve, cos, sin, self.windows[i], kv_cache)
                if spec.backout and i == cfg.n_layer // 2:
                    x_mid = x
            if x_mid is not None:
                x = x - self.backout_lambda * x_mid
            logits = self.lm_head(norm(x))[..., : cfg.vocab_size].float()
            return spec.softcap * torch.tanh(logits / spec.softcap)

        @torch.inference_mode()
        def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k=None, seed=42):
            rng = torch.Generator().manual_seed(seed)
            prefill = KVCache(1, len(tokens))
            logits = self.forward(torch.tensor([tokens], dtype=torch.long), kv_cache=prefill)[:, -1, :]
            cache = KVCache(1, len(tokens) + max_tokens)
            cache.prefill(prefill)
            generated = 0
            while generated < max_tokens:
                if temperature == 0.0:
                    next_ids = torch.argmax(logits, dim=-1, keepdim=True)
                else:
                    probs = F.softmax(logits / temperature, dim=-1)
                    next_ids = torch.multinomial(probs, num_samples=1, generator=rng)
                column = next_ids[:, 0].tolist()
                yield column
                generated += 1
                ids = torch.tensor(column, dtype=torch.long).unsqueeze(1)
                logits = self.forward(ids, kv_cache=cache)[:, -1, :]

    model = GPT()
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in ckpt.weights.items()}
    model.load_state_dict(state, strict=True)
    return model.to(tdtype).eval()


# --- measurement ------------------------------------------------------------------------------------


def memory_bandwidth_gbps(size_mb: int = 256, repeats: int = 5) -> float:
    """Best observed read bandwidth (GB/s): numpy sums of a large float32 array (single thread)."""
    a = np.ones(size_mb * 2**20 // 4, np.float32)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def quality(ckpt: Checkpoint, dtype: str, bits: int, backend: str = "mlx") -> dict[str, float]:
    """Teacher-forced logits of the quantized vs the unquantized model on English-like text."""
    ids = [ckpt.tokenizer.get_bos_token_id(), *ckpt.tokenizer.encode(QUALITY_TEXT * 2)][:256]

    def logits(quantize: int | None) -> np.ndarray:
        model = build_model(ckpt, dtype=dtype, quantize=quantize, backend=backend)
        if backend == "torch":
            import torch

            with torch.inference_mode():
                return model(torch.tensor([ids], device=model.device))[0].cpu().numpy()
        import mlx.core as mx

        return np.array(model(mx.array([ids]))[0])

    ref, q = logits(None), logits(bits)
    return {
        "mean_abs_dlogit": float(np.abs(ref - q).mean()),
        "max_abs_dlogit": float(np.abs(ref - q).max()),
        "mean_abs_logit": float(np.abs(ref).mean()),
        "greedy_agreement": float((ref.argmax(-1) == q.argmax(-1)).mean()),
        "positions": len(ids),
    }


def _prompt(ckpt: Checkpoint, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    top = ckpt.config.vocab_size - 9  # ordinary tokens only
    return [ckpt.tokenizer.get_bos_token_id(), *rng.integers(0, top, size=n - 1).tolist()]


def _rows(c: Contender, geometry: str, arch: str, decode_tokens: int, bandwidth: float, trials: int) -> list[Row]:
    rows = []
    for n, results in sorted(c.results.items()):
        context = n + decode_tokens // 2
        per_token = c.active_bytes + c.kv_bytes_per_position(context)
        pre = [t.prefill_tps for t in results]
        dec = [t.decode_tps for t in results]
        peaks = [t.peak_memory_bytes for t in results if t.peak_memory_bytes is not None]
        rows.append(
            Row(
                c.impl,
                c.backend,
                c.device,
                c.dtype,
                c.quantize,
                geometry,
                n,
                context,
                statistics.median(pre),
                statistics.median(dec),
                statistics.median(t.ttft_s for t in results),
                max(peaks) if peaks else None,
                c.weight_bytes,
                bandwidth,
                bandwidth * 1e9 / per_token,
                len(results),
                arch,
                decode_tokens,
                (min(pre), max(pre)),
                (min(dec), max(dec)),
                c.load_cold_s,
                c.load_warm_s,
            )  # fmt: skip
        )
    return rows


def run_benchmark(
    ckpt: Checkpoint,
    *,
    geometry: str,
    source: str | None = None,
    backends: tuple[str, ...] = ("mlx",),
    dtypes: tuple[str, ...] = ("float32",),
    quantize: tuple[int | None, ...] = (None,),
    compare: tuple[str, ...] = (),
    prompt_lengths: tuple[int, ...] = (128, 512, 2048),
    decode_tokens: int = 32,
    trials: int = 3,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[Row]:
    """Measure every implementation x backend x dtype x quantization; trials interleaved."""
    limit = ckpt.config.rope_len - decode_tokens
    prompt_lengths = tuple(n for n in prompt_lengths if n <= limit) or (min(limit, 16),)
    bandwidth = memory_bandwidth_gbps()
    log(f"memory read bandwidth ~{bandwidth:.1f} GB/s (numpy, one thread)")
    mlx_lm_ok = not (ckpt.spec.lambdas or ckpt.spec.value_embeds or ckpt.spec.smear)
    if "mlx-lm" in compare and not mlx_lm_ok:
        log(f"note: mlx-lm's nanochat model computes g1 math only; skipping it for {ckpt.spec.name} (use --arch g1)")
    contenders: list[Contender] = []
    for dtype in dtypes:
        for bits in quantize:
            for backend in backends:
                if bits and backend == "torch" and (bits == 4 or dtype == "float32"):
                    continue  # the torch backend quantizes to 8 bits, with 16-bit activations
                log(f"loading nanochat-mlx ({backend}, {dtype}{f', q{bits}' if bits else ''})")
                contenders.append(ours(ckpt, backend, dtype, bits, source))
            if "mlx-lm" in compare and mlx_lm_ok:
                log(f"loading mlx-lm ({dtype}{f', q{bits}' if bits else ''})")
                contenders.append(mlx_lm_contender(ckpt, dtype, bits))
        if "reference" in compare:
            log(f"loading reference (torch, {dtype})")
            contenders.append(reference_contender(ckpt, dtype))
    if any(q is not None for q in quantize) and "mlx" in backends:
        import mlx.core as mx

        if mx.default_device() != mx.gpu:
            log("note: MLX's quantized matmul kernels are slow on the CPU; quantization pays off on Metal")
    prompts = {n: _prompt(ckpt, n, seed=n) for n in prompt_lengths}
    for c in contenders:  # warm-up: compile kernels, touch the weights
        c.run(_prompt(ckpt, 8, seed=1), 2)
    for trial in range(trials):
        for n in prompt_lengths:
            for c in contenders:
                result = c.run(prompts[n], decode_tokens)
                c.results.setdefault(n, []).append(result)
                log(
                    f"trial {trial + 1}/{trials} {c.impl:12s} {c.backend:5s} {c.dtype:8s} q={c.quantize} "
                    f"prompt {n:5d}: prefill {result.prefill_tps:8.1f} tok/s, decode {result.decode_tps:6.2f} tok/s"
                )
    rows = [row for c in contenders for row in _rows(c, geometry, ckpt.spec.name, decode_tokens, bandwidth, trials)]
    for backend, dtype, bits in sorted({(r.backend, r.dtype, r.quantize) for r in rows if r.quantize}):
        q = quality(ckpt, dtype, bits, backend)
        log(
            f"quality q{bits} {backend} {dtype}: mean |dlogit| {q['mean_abs_dlogit']:.4f} (mean |logit| "
            f"{q['mean_abs_logit']:.3f}), greedy agreement {q['greedy_agreement'] * 100:.1f}%"
        )
        for r in rows:
            if (r.backend, r.dtype, r.quantize) == (backend, dtype, bits):
                r.quality = q
    return rows


# --- output -----------------------------------------------------------------------------------------


def machine_facts(bandwidth: float | None = None) -> dict[str, Any]:
    """CPU, cores, memory and library versions, for the results file."""
    import os

    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        facts["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for mod in ("mlx", "mlx_lm", "numpy", "torch"):
        try:
            from importlib.metadata import version

            facts[mod] = version(mod.replace("_", "-"))
        except Exception:
            pass
    if bandwidth is not None:
        facts["bandwidth_gbps"] = round(bandwidth, 2)
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(rows: list[Row]) -> str:
    """Results table plus ratio tables (ours / other) at equal backend, dtype and quantization."""
    out = [
        "| impl | backend | dtype | quant | geometry | prompt | ctx | prefill tok/s | decode tok/s (min-max) "
        "| TTFT s | peak MiB | weights MiB | roofline tok/s | % roofline | load cold/warm s | trials |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        peak = f"{r.peak_memory_bytes / 2**20:.0f}" if r.peak_memory_bytes else "n/a"
        out.append(
            f"| {r.impl} | {r.backend} | {r.dtype} | {r.quantize or '-'} | {r.geometry} ({r.arch}) | {r.prompt_tokens} "
            f"| {r.context} | {r.prefill_tps:.1f} | {r.decode_tps:.2f} ({r.decode_tps_range[0]:.2f}-"
            f"{r.decode_tps_range[1]:.2f}) | {r.ttft_s:.2f} | {peak} | {r.weight_bytes / 2**20:.0f} "
            f"| {r.roofline_decode_tps:.1f} | {100 * r.roofline_fraction:.0f}% "
            f"| {r.load_cold_s or 0:.2f}/{r.load_warm_s or 0:.2f} | {r.trials} |"
        )
    ratios = []
    for r in rows:
        if r.impl != "nanochat-mlx":
            continue
        for o in rows:
            if o.impl != "nanochat-mlx" and (o.dtype, o.quantize, o.prompt_tokens) == (
                r.dtype,
                r.quantize,
                r.prompt_tokens,
            ):
                ratios.append(
                    f"| nanochat-mlx ({r.backend}) / {o.impl} ({o.backend}) | {r.dtype} | {r.quantize or '-'} "
                    f"| {r.prompt_tokens} | {r.prefill_tps / o.prefill_tps:.2f}x | {r.decode_tps / o.decode_tps:.2f}x "
                    f"| {o.ttft_s / r.ttft_s:.2f}x |"
                )
    if ratios:
        out += [
            "",
            "| ratio (higher = ours faster) | dtype | quant | prompt | prefill | decode | TTFT |",
            "|" + "---|" * 7,
        ]
        out += ratios
    quality_rows = {(r.backend, r.dtype, r.quantize): r.quality for r in rows if r.quality}
    if quality_rows:
        out += [
            "",
            "| quantization | backend | dtype | mean abs dlogit | mean abs logit | greedy agreement |",
            "|---|---|---|---|---|---|",
        ]
        for (backend, dtype, bits), q in sorted(quality_rows.items()):
            out.append(
                f"| {bits}-bit | {backend} | {dtype} | {q['mean_abs_dlogit']:.4f} | {q['mean_abs_logit']:.3f} "
                f"| {100 * q['greedy_agreement']:.1f}% |"
            )
    return "\n".join(out) + "\n"


def plot(rows: list[Row], path: Path) -> bool:
    """Decode and prefill tok/s vs context per implementation; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: --plot needs matplotlib (pip install matplotlib); no plot written", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[Row]] = {}
    for r in rows:
        series.setdefault(f"{r.impl} {r.backend} {r.dtype}{f' q{r.quantize}' if r.quantize else ''}", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r.context)
        ax1.plot([r.context for r in rs], [r.decode_tps for r in rs], marker="o", label=label)
        ax2.plot([r.prompt_tokens for r in rs], [r.prefill_tps for r in rs], marker="o", label=label)
    geometry = rows[0].geometry if rows else ""
    for ax, title, xl in ((ax1, "decode", "context (tokens)"), (ax2, "prefill", "prompt (tokens)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xl)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} — {geometry}")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# --- command line -----------------------------------------------------------------------------------


def chat_turn_ttft(
    ckpt: Checkpoint, backend: str, dtype: str, turns: int = 5, reply_tokens: int = 32, message_words: int = 60
) -> dict:
    """Time to first token of the last of ``turns`` chat turns, with and without the prompt cache.

    The warm session keeps its KV cache across turns (only the new message is prefilled); the
    cold one is handed the same history and prefills all of it, as the reference's chat does.
    """
    from .engine import Engine
    from .sampling import SamplingParams
    from .session import ChatSession, Turn

    engine = Engine(build_model(ckpt, dtype=dtype, backend=backend), ckpt.tokenizer)
    params = SamplingParams(temperature=0.0, top_k=None, max_tokens=reply_tokens)
    words = "the model reads every token of the conversation again unless its cache is kept".split()
    messages = [" ".join(words[(i + j) % len(words)] for j in range(message_words)) for i in range(turns)]
    warm = ChatSession(engine, params=params)
    for message in messages:
        for _ in warm.stream(message):
            pass
    cold = ChatSession(engine, params=params)
    cold.load_turns([Turn(t.user, t.reply, list(t.reply_tokens)) for t in warm.turns[:-1]])
    for _ in cold.stream(messages[-1]):
        pass
    w, c = warm.last_stats, cold.last_stats
    return {
        "backend": engine.runner.name,
        "dtype": dtype,
        "turn": turns,
        "prompt_tokens": w.prompt_tokens,
        "prefilled_with_cache": w.prefill_tokens,
        "ttft_with_cache_s": w.ttft_s,
        "ttft_without_cache_s": c.ttft_s,
    }


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanochat-mlx bench", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", help="checkpoint to benchmark (any source nanochat-mlx loads)")
    src.add_argument("--geometry", help="random weights with nanochat's shapes: d12, d20, d32 (default d12)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--arch", default=None, help="generation g1..g9 (geometry default g9; source: detected)")
    p.add_argument("--backend", default="mlx", choices=("mlx", "torch", "all"))
    p.add_argument("--dtype", action="append", help="float32, bfloat16, float16 (repeat or comma-separate)")
    p.add_argument("--quantize", action="append", help="4 or 8 (repeat or comma-separate; 'none' = unquantized)")
    p.add_argument("--compare", action="append", help="mlx-lm, reference or all (repeat or comma-separate)")
    p.add_argument("--prompt-tokens", default=None, help="comma-separated prompt lengths (default 128,512,2048)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per run (default 32)")
    p.add_argument("--quick", action="store_true", help="one trial, short prompts, few decoded tokens")
    p.add_argument("--trials", type=int, default=None, help="trials per configuration (default 3)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random geometry weights")
    p.add_argument(
        "--chat-turns", type=int, default=5, help="TTFT of this chat turn with/without the prompt cache (0: skip)"
    )
    p.add_argument("--json", type=Path, default=None, help="write rows (and machine facts) as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown tables")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of tok/s vs context (needs matplotlib)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nanochat-mlx bench``; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    from .options import DTYPES

    dtypes = tuple(_split(args.dtype) or ["float32"])
    for d in dtypes:
        if d not in DTYPES:
            raise NanochatError(f"unknown dtype {d!r} (choose {', '.join(DTYPES)})")
    quantize: list[int | None] = []
    for q in _split(args.quantize) or ["none"]:
        if q.lower() == "none":
            quantize.append(None)
        elif q in ("4", "8"):
            quantize.append(int(q))
        else:
            raise NanochatError(f"unsupported quantization {q!r} (choose 4 or 8)")
    compare = _split(args.compare)
    if "all" in compare:
        compare = ["mlx-lm", "reference"]
    for c in compare:
        if c not in ("mlx-lm", "reference"):
            raise NanochatError(f"unknown --compare {c!r} (choose mlx-lm, reference)")
    if "reference" in compare and importlib.util.find_spec("torch") is None:
        raise NanochatError("--compare reference needs PyTorch")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    backends: tuple[str, ...] = (args.backend,)
    if args.backend == "all":
        have_torch = importlib.util.find_spec("nanochat_mlx.backends.torch.model") is not None
        backends = ("mlx", "torch") if have_torch and importlib.util.find_spec("torch") else ("mlx",)
        if backends == ("mlx",):
            print("note: the torch backend is not available; measuring MLX only", file=sys.stderr)
    if args.source:
        ckpt = read_checkpoint(args.source, step=args.step, arch=args.arch)
        geometry = f"{Path(args.source).name or args.source} (n_layer={ckpt.config.n_layer})"
    else:
        from .synthetic import random_checkpoint

        geometry = args.geometry or "d12"
        print(f"building random {geometry} weights ({args.arch or 'g9'})", file=sys.stderr)
        ckpt = random_checkpoint(geometry, arch=args.arch or "g9", seed=args.seed)
    if args.prompt_tokens:
        lengths = tuple(int(x) for x in args.prompt_tokens.split(","))
    else:
        lengths = (128,) if args.quick else (128, 512, 2048)
    decode_tokens = args.decode_tokens or (8 if args.quick else 32)
    trials = args.trials or (1 if args.quick else 3)
    rows = run_benchmark(
        ckpt,
        geometry=geometry,
        source=args.source,
        backends=backends,
        dtypes=dtypes,
        quantize=tuple(quantize),
        compare=tuple(compare),
        prompt_lengths=lengths,
        decode_tokens=decode_tokens,
        trials=trials,
    )
    table = markdown(rows)
    turns = []
    for backend in backends if args.chat_turns > 0 else ():
        words = 12 if args.quick else 60
        t = chat_turn_ttft(ckpt, backend, dtypes[0], args.chat_turns, reply_tokens=decode_tokens, message_words=words)
        turns.append(t)
        table += (
            f"\nChat turn {t['turn']} ({t['backend']}, {t['dtype']}, {t['prompt_tokens']} prompt tokens): "
            f"time to first "
            f"token {t['ttft_with_cache_s'] * 1000:.0f} ms with the prompt cache ({t['prefilled_with_cache']} tokens "
            f"prefilled) vs {t['ttft_without_cache_s'] * 1000:.0f} ms without "
            f"({t['ttft_without_cache_s'] / max(t['ttft_with_cache_s'], 1e-9):.1f}x)\n"
        )
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    if args.json:
        payload = {
            "machine": machine_facts(rows[0].bandwidth_gbps if rows else None),
            "rows": [asdict(r) for r in rows],
            "chat_turns": turns,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
