"""nanochat's GPT in MLX, every generation g1..g9, following mlx-lm's model protocol.

``model(inputs, cache=None)`` returns float32 logits ``(B, T, vocab_size)``; ``model.layers``
and ``model.make_cache()`` let ``mlx_lm.generate.generate_step`` drive it. What differs between
generations is read from the ``ArchSpec`` (flags and constants), never from its name.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...checkpoint import Checkpoint
from ...config import RMS_EPS, ArchSpec, ModelConfig
from ...errors import NanochatError
from ...rope import rotary_inv_freq, rotary_tables
from ...weights import canonical_name, nonfinite_error, release_pages
from .cache import KVCache, SmearMemory, WindowKVCache, causal_mask
from .lanes import SERIAL, Lanes, device_lanes


def rms_norm(x: mx.array) -> mx.array:
    """Parameter-free RMSNorm with the reference's eps (torch.finfo(float32).eps)."""
    return mx.fast.rms_norm(x, None, RMS_EPS)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate half-split pairs by -theta, as the reference does. x: (B, H, T, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def __call__(self, x: mx.array, lanes: Lanes) -> mx.array:
        return lanes(self.c_proj, nn.relu2(lanes(self.c_fc, x)))  # relu(x)^2 as one compiled kernel


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: ArchSpec, has_ve: bool) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        if has_ve:
            self.ve_gate = nn.Linear(spec.ve_gate_channels, self.n_kv_head, bias=False)
        self._ve_channels = spec.ve_gate_channels
        self._ve_scale = spec.ve_gate_scale
        # q and k are each scaled by qk_scale after QK-norm (g8/g9): fold both into SDPA's scale.
        self._scale = spec.qk_scale**2 / math.sqrt(self.head_dim)

    def __call__(self, x, ve, rotate, mask, cache, lanes: Lanes) -> mx.array:
        B, T, _ = x.shape
        q = lanes(self.c_q, x).reshape(B, T, self.n_head, self.head_dim)
        k = lanes(self.c_k, x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = lanes(self.c_v, x).reshape(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self._ve_scale * mx.sigmoid(self.ve_gate(x[..., : self._ve_channels]))
            v = v + gate[..., None] * ve.reshape(B, T, self.n_kv_head, self.head_dim)
        # Rotary first, then QK-norm (the reference's order).
        q = rms_norm(rotate(q.transpose(0, 2, 1, 3)))
        k = rms_norm(rotate(k.transpose(0, 2, 1, 3)))
        v = v.transpose(0, 2, 1, 3)
        if isinstance(cache, list):  # rows stepped together: each attends to its own cache
            # Every position is its own batch row here (N, H, 1, D); a row's n positions are
            # consecutive, and become one sequence (1, H, n, D). ``mask``: each row's (n, mask).
            ys, start = [], 0
            for row, (n, row_mask) in zip(cache, mask, strict=True):
                end = start + n
                k_i, v_i = row.update_and_fetch(k[start:end].transpose(2, 1, 0, 3), v[start:end].transpose(2, 1, 0, 3))
                q_i = q[start:end].transpose(2, 1, 0, 3)
                y_i = mx.fast.scaled_dot_product_attention(q_i, k_i, v_i, scale=self._scale, mask=row_mask)
                ys.append(y_i.transpose(2, 1, 0, 3))
                start = end
            y = mx.concatenate(ys)
        else:
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self._scale, mask=mask)
        return lanes(self.c_proj, y.transpose(0, 2, 1, 3).reshape(B, T, -1))


class _Slot:
    """One layer's cache inside the compiled decode step: the new key and value are written into
    the whole buffers at ``index`` (a graph input), and a mask shows attention the valid entries."""

    def __init__(self, keys: mx.array, values: mx.array, index: mx.array) -> None:
        self.keys, self.values, self.index = keys, values, index

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.index, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.index, axes=(2,))
        return self.keys, self.values


class Block(nn.Module):
    def __init__(self, config: ModelConfig, spec: ArchSpec, has_ve: bool) -> None:
        super().__init__()
        self.attn = Attention(config, spec, has_ve)
        self.mlp = MLP(config.n_embd)

    def __call__(self, x, ve, rotate, mask, cache, lanes: Lanes) -> mx.array:
        x = x + self.attn(rms_norm(x), ve, rotate, mask, cache, lanes)
        return x + self.mlp(rms_norm(x), lanes)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, spec: ArchSpec) -> None:
        super().__init__()
        ve_layers = set(config.ve_layers(spec))
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.h = [Block(config, spec, i in ve_layers) for i in range(config.n_layer)]


class GPT(nn.Module):
    """The nanochat GPT of one generation (``spec``) and geometry (``config``)."""

    def __init__(self, config: ModelConfig, spec: ArchSpec, dtype: mx.Dtype = mx.float32) -> None:
        super().__init__()
        self.config, self.spec, self.dtype = config, spec, dtype
        self.quantization: int | None = None  # bits, once quantized
        self.model_type = "nanochat"
        self.transformer = Transformer(config, spec)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        kv_dim = config.n_kv_head * config.head_dim
        ve_layers = set(config.ve_layers(spec))
        # A list indexed by layer (None where a layer has none) keeps the names value_embeds.<i>.weight.
        self.value_embeds = [
            nn.Embedding(config.padded_vocab_size, kv_dim) if i in ve_layers else None for i in range(config.n_layer)
        ]
        if spec.lambdas:
            self.resid_lambdas = mx.ones((config.n_layer,))
            self.x0_lambdas = mx.zeros((config.n_layer,))
        if spec.smear:
            self.smear_gate = nn.Linear(spec.smear_channels, 1, bias=False)
            self.smear_lambda = mx.zeros((1,))
        if spec.backout:
            self.backout_lambda = mx.zeros((1,))
        self.window_sizes = config.window_sizes(spec)
        self._compiled_decode = None  # made on the first decode step (see decode)
        # Underscore names keep these out of parameters() (they are never saved).
        if spec.rope_table_bf16:  # g1-g6: bf16-rounded tables that no fused kernel reproduces
            cos, sin = rotary_tables(config.head_dim, config.rope_len, spec.rope_base, bf16=True)
            self._cos, self._sin = mx.array(cos).astype(dtype), mx.array(sin).astype(dtype)
            self._rope_periods = None
        else:  # g7+: mx.fast.rope with the negated wavelengths base^(2j/D) gives the -theta rotation
            self._rope_periods = -mx.array(1.0 / rotary_inv_freq(config.head_dim, spec.rope_base))

    def make_runner(self):
        """The engine's runner for this model."""
        from .runner import MLXRunner

        return MLXRunner(self)

    @property
    def layers(self) -> list[Block]:
        return self.transformer.h

    def make_cache(self) -> list[Any]:
        """Per-layer KV caches (windowed layers keep only w+1 keys), then g9's smear memory."""
        caches: list[Any] = [KVCache() if w is None else WindowKVCache(w) for w in self.window_sizes]
        if self.spec.smear:
            caches.append(SmearMemory())
        return caches

    def _mask(self, i: int, T: int, cache: Any) -> mx.array | str | None:
        if cache is not None:
            return cache.make_mask(T)
        w = self.window_sizes[i]
        if w is None or T <= w + 1:
            return "causal" if T > 1 else None
        return causal_mask(T, 0, w)

    def _rotation(self, offset: int | mx.array, T: int):
        """The rotary embedding for positions offset..offset+T-1, applied to (B, H, T, D).

        ``offset`` may also be an array of B positions (one decode step of rows at different positions).
        """
        if self._rope_periods is not None:
            periods, D = self._rope_periods, self.config.head_dim
            return lambda x: mx.fast.rope(x, D, traditional=False, base=None, scale=1.0, offset=offset, freqs=periods)
        if isinstance(offset, mx.array):
            cos, sin = self._cos[offset][:, None, None], self._sin[offset][:, None, None]
        else:
            cos = self._cos[offset : offset + T][None, None]
            sin = self._sin[offset : offset + T][None, None]
        return lambda x: apply_rotary(x, cos, sin)

    def _smear(self, x: mx.array, memory: SmearMemory | None) -> mx.array:
        """Mix each position's normed embedding with its predecessor's (g9)."""
        gate = self.smear_lambda.astype(x.dtype) * mx.sigmoid(self.smear_gate(x[..., : self.spec.smear_channels]))
        prev = memory.prev if memory is not None else None
        if memory is not None:
            memory.prev = x[:, -1:]
        if prev is not None:
            return x + gate * mx.concatenate([prev, x[:, :-1]], axis=1)
        if x.shape[1] == 1:
            return x  # position 0 has no predecessor
        return mx.concatenate([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], axis=1)

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None, last_only: bool = False) -> mx.array:
        """Logits for ``inputs`` (B, T); ``last_only`` keeps just the last position (prefill)."""
        B, T = inputs.shape
        n_layer = self.config.n_layer
        layer_caches = cache[:n_layer] if cache is not None else [None] * n_layer
        offset = layer_caches[0].offset if cache is not None else 0
        self.config.check_context(offset + T)
        x = rms_norm(self.transformer.wte(inputs).astype(self.dtype))
        if self.spec.smear:
            x = self._smear(x, cache[n_layer] if cache is not None else None)
        masks = [self._mask(i, T, c) for i, c in enumerate(layer_caches)]
        return self._trunk(inputs, x, self._rotation(offset, T), masks, layer_caches, last_only)

    def decode(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        """One decode step of ``inputs`` (B,) on ``cache``: logits (B, V), as ``self(inputs[:, None], cache)``.

        The step is one compiled graph (``mx.compile``: traced once per buffer size, elementwise
        chains fused, no per-token graph building) whose state is the caches' whole buffers, written
        at a slot index and masked to their valid entries, so every step has the same shapes. A
        step where a buffer must grow first (every 256 positions) runs uncompiled.
        """
        n_layer = self.config.n_layer
        layers = cache[:n_layer]
        slots = [c.slot() for c in layers]
        smear = [cache[n_layer].prev] if self.spec.smear else []
        if any(s is None for s in slots + smear):
            return self(inputs[:, None], cache=cache)[:, -1]
        offset = layers[0].offset
        self.config.check_context(offset + 1)
        if self._compiled_decode is None:
            self._compiled_decode = mx.compile(self._decode_graph, inputs=self.state)
        state = [
            [c.keys, c.values, mx.array([i], mx.int32), mx.array([v], mx.int32)]
            for c, (i, v) in zip(layers, slots, strict=True)
        ]
        positions = mx.full((inputs.shape[0],), offset, mx.int32)
        logits, buffers, smear = self._compiled_decode(inputs[:, None], positions, state, smear)
        for c, (keys, values) in zip(layers, buffers, strict=True):
            c.keys, c.values = keys, values
            c.advance()
        if self.spec.smear:
            cache[n_layer].prev = smear[0]
        return logits

    def _decode_graph(self, inputs: mx.array, positions: mx.array, state: list, smear: list) -> tuple:
        """The traced decode step: ``state`` holds each layer's [keys, values, slot index, valid entries]."""
        slots = [_Slot(keys, values, index) for keys, values, index, _ in state]
        masks = [(mx.arange(keys.shape[2]) < visible).reshape(1, 1, 1, -1) for keys, _, _, visible in state]
        x = rms_norm(self.transformer.wte(inputs).astype(self.dtype))
        if self.spec.smear:
            memory = SmearMemory()
            memory.prev = smear[0]
            x = self._smear(x, memory)
            smear = [memory.prev]
        logits = self._trunk(inputs, x, self._rotation(positions, 1), masks, slots, False)[:, -1]
        return logits, [[s.keys, s.values] for s in slots], smear

    def decode_rows(self, inputs: mx.array, rows: list[list[Any]], lengths: list[int] | None = None) -> mx.array:
        """One step of B independent rows: row b is fed the next ``lengths[b]`` ids (default 1 each)
        of ``inputs`` (N,) on its own one-row cache ``rows[b]``. Logits (B, V) of each row's last id.

        Each row keeps its own position, sliding windows and smear state; the matrix products run
        once for all N positions, attention once per row over that row's own keys. A row fed
        several ids is a prompt chunk riding along with the decoding rows (its prefill shares
        their weight reads).
        """
        n_layer = self.config.n_layer
        lengths = lengths or [1] * len(rows)
        ends = list(itertools.accumulate(lengths))
        positions = []
        for row, n in zip(rows, lengths, strict=True):
            self.config.check_context(row[0].offset + n)
            positions.extend(range(row[0].offset, row[0].offset + n))
        ids = inputs[:, None]  # (N, 1): every position its own row of the products
        x = rms_norm(self.transformer.wte(ids).astype(self.dtype))
        if self.spec.smear:  # x + gate * the previous position's embedding, as _smear, row by row
            prev = []
            for row, n, end in zip(rows, lengths, ends, strict=True):
                memory = row[n_layer]
                # A row's position 0 has no predecessor: adding gate * 0 leaves it as it is.
                prev += [mx.zeros_like(x[:1]) if memory.prev is None else memory.prev, x[end - n : end - 1]]
                memory.prev = x[end - 1 : end]
            gate = self.smear_lambda.astype(x.dtype) * mx.sigmoid(self.smear_gate(x[..., : self.spec.smear_channels]))
            x = x + gate * mx.concatenate(prev)
        layer_caches = [[row[i] for row in rows] for i in range(n_layer)]
        # Each layer's mask for each row's new positions, from its cache before they are stored.
        masks = [[(n, c.make_mask(n)) for c, n in zip(caches, lengths, strict=True)] for caches in layer_caches]
        rotate = self._rotation(mx.array(positions), 1)
        take = None if len(positions) == len(rows) else mx.array([end - 1 for end in ends])
        return self._trunk(ids, x, rotate, masks, layer_caches, False, take)[:, -1]

    def _trunk(self, inputs, x, rotate, masks, layer_caches, last_only: bool, take: mx.array | None = None) -> mx.array:
        """The blocks, backout, final norm, head and softcap on the normed (smeared) embedding ``x``;
        the head runs on the last position only (``last_only``) or on the batch rows ``take``.

        Inference (with caches) splits the matrix products over the device's lanes; training and
        teacher-forced passes (no cache) run them whole, so their gradients stay whole too.
        """
        lanes = device_lanes() if layer_caches[0] is not None else SERIAL
        n_layer = self.config.n_layer
        x0 = x
        x_mid = None
        for i, block in enumerate(self.transformer.h):
            if self.spec.lambdas:
                x = self.resid_lambdas[i].astype(x.dtype) * x + self.x0_lambdas[i].astype(x.dtype) * x0
            ve = self.value_embeds[i](inputs).astype(x.dtype) if self.value_embeds[i] is not None else None
            x = block(x, ve, rotate, masks[i], layer_caches[i], lanes)
            if self.spec.backout and i == n_layer // 2:
                x_mid = x
        if x_mid is not None:
            x = x - self.backout_lambda.astype(x.dtype) * x_mid
        if last_only:
            x = x[:, -1:]
        if take is not None:
            x = x[take]
        logits = lanes(self.lm_head, rms_norm(x))[..., : self.config.vocab_size].astype(mx.float32)
        cap = self.spec.softcap
        return cap * mx.tanh(logits / cap)


MLX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
QUANT_GROUP = 64


def default_dtype() -> str:
    """float32 on the CPU (the parity target), bfloat16 on a GPU."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def device_name() -> str:
    return "gpu (Metal)" if mx.default_device() == mx.gpu else "cpu"


def to_mlx(array: np.ndarray) -> mx.array:
    """A numpy tensor (bfloat16 via ml_dtypes included) as an MLX array, bit-exact."""
    if array.dtype == ml_dtypes.bfloat16:
        return mx.array(array.view(np.uint16)).view(mx.bfloat16)
    return mx.array(array)


def _arrays(ckpt: Checkpoint) -> Iterator[tuple[str, mx.array]]:
    """Each canonical tensor as an MLX array, lazily: a converted folder's own safetensors files are
    read by ``mx.load`` (no numpy copy), everything else is copied from its numpy array."""
    loaded: dict[str, mx.array] = {}
    if ckpt.files.layout == "converted":
        for path in ckpt.files.weights:
            loaded.update((canonical_name(k), v) for k, v in mx.load(str(path)).items())
    for name, array in ckpt.weights.items():
        yield name, loaded.pop(name) if name in loaded else to_mlx(array)


def _finite(w: mx.array, name: str, origin: str) -> mx.array:
    """``w`` evaluated, once it is known to hold no NaN or infinity.

    A sum is the cheapest full read (a NaN or infinity makes it non-finite); only then are the
    values counted, since a sum of large finite values can overflow too.
    """
    total = mx.sum(w) if mx.issubdtype(w.dtype, mx.floating) else None
    mx.eval(w, total) if total is not None else mx.eval(w)
    if total is not None and not math.isfinite(total.item()):
        nan, inf = mx.isnan(w).sum().item(), mx.isinf(w).sum().item()
        if nan or inf:
            raise nonfinite_error(origin, name, nan, inf, w.size)
    return w


def quantizable(path: str, module: nn.Module) -> bool:
    """Linear and embedding layers whose rows split into whole quantization groups."""
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % QUANT_GROUP == 0


def build_mlx_model(ckpt: Checkpoint, dtype: str | None = None, quantize: int | None = None) -> GPT:
    dtype = dtype or default_dtype()
    mdtype = MLX_DTYPES[dtype]
    model = GPT(ckpt.config, ckpt.spec, dtype=mdtype)
    stored_bits = (ckpt.quantization or {}).get("bits")
    if stored_bits and quantize not in (None, stored_bits):
        raise NanochatError(
            f"{ckpt.name} is already quantized to {stored_bits} bits; convert the original to change that"
        )
    if ckpt.quantization:  # a quantized converted folder: build the quantized shapes first
        nn.quantize(
            model,
            group_size=ckpt.quantization["group_size"],
            bits=ckpt.quantization["bits"],
            class_predicate=quantizable,
        )
    weights = []
    for name, w in _arrays(ckpt):
        if mx.issubdtype(w.dtype, mx.floating) and w.dtype != mdtype:
            w = w.astype(mdtype)
        w = _finite(w, name, ckpt.name)  # one tensor at a time: the model so far plus one tensor
        release_pages(ckpt.weights[name])
        weights.append((name, w))
    model.load_weights(weights, strict=True)
    if quantize is not None and not ckpt.quantization:
        if mx.default_device() != mx.gpu:
            print("note: MLX's quantized kernels are slow on the CPU; quantization pays off on Metal", file=sys.stderr)
        nn.quantize(model, group_size=QUANT_GROUP, bits=quantize, class_predicate=quantizable)
    mx.eval(model.parameters())
    model.quantization = stored_bits or quantize
    return model
