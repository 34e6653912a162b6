"""The nanochat GPT in PyTorch (CUDA, MPS or CPU) and the engine's runner for it.

It computes what ``nanochat_mlx.model`` computes, for every generation, from the same ``Checkpoint``
(canonical weights, ``ArchSpec``, ``ModelConfig``). Two layout choices keep decoding lean:

- each layer's q, k, v projections (and its value-embedding gate, zero-padded to the full width)
  are concatenated into one matrix at load time, so a layer runs one input matmul, and q and k
  are rotated and normed together;
- ``KVCache`` is preallocated: full-attention layers store position p in slot p and grow in steps,
  windowed layers (query i sees keys i-w..i) store p in slot p % (w+1) and never hold more.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import NamedTuple

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint
from ..config import RMS_EPS, ArchSpec, ModelConfig
from ..errors import NanochatError
from ..rope import rotary_tables
from ..sampling import SamplingParams

try:
    import resource
except ImportError:  # Windows: no getrusage
    resource = None

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_STEP = 256  # full-attention caches grow by whole steps of this many positions (and by half at least)
REPETITION_CONTEXT = 20  # tokens the repetition penalty looks back over (mlx-lm's default, as the MLX runner)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> str:
    """bfloat16 on CUDA, float32 elsewhere (the parity target on the CPU)."""
    return "bfloat16" if device.type == "cuda" else "float32"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "mps (Metal)" if device.type == "mps" else "cpu"


def to_torch(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A canonical numpy tensor (bfloat16 via ml_dtypes included, bit-exact) on ``device`` in ``dtype``."""
    bf16 = array.dtype == ml_dtypes.bfloat16
    # np.array copies: the canonical arrays are often read-only views of a memory-mapped file,
    # and the tensor must own its memory.
    host = torch.from_numpy(np.array(array.view(np.int16) if bf16 else array))
    if bf16:
        host = host.view(torch.bfloat16)
    return host.to(device=device, dtype=dtype)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm with the reference's eps (torch.finfo(float32).eps, in every dtype)."""
    return F.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)


def frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


# --- KV cache -----------------------------------------------------------------------------------


class Slots(NamedTuple):
    """What the layers of one window size attend to in one forward call, and where they store it.

    Without a cache only ``mask``/``causal`` matter. With one, in the ``stored`` case the new keys
    go to the slots ``write`` (a slice) and the keys attended to are ``buffer[read]``; otherwise (a
    windowed layer fed several positions past its ring) they are the first ``old`` stored slots
    followed by the new keys, and the new positions ``keep`` are then stored at the slot indices
    ``write`` (a tensor).
    """

    mask: torch.Tensor | None = None  # bool (T, keys): True = visible
    causal: bool = False
    capacity: int = 0  # slots each layer's buffers must have
    stored: bool = True
    write: slice | torch.Tensor = slice(None)
    read: slice = slice(None)
    old: int = 0
    keep: slice = slice(None)


def visible(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool mask (Tq, Tk) of absolute positions: key j visible to query i iff 0 <= i - j <= w."""
    distance = queries[:, None] - keys[None, :]
    return (distance >= 0) & (distance <= window) if window is not None else distance >= 0


class KVCache:
    """Preallocated keys/values per layer, (B, n_kv_head, slots, head_dim), plus g9's smear memory.

    A full-attention layer (window None) stores position p in slot p; its buffers grow by at least
    ``CACHE_STEP`` slots and by half their size, never per token. A windowed layer stores p in slot
    p % (w+1), the w+1 keys its queries can see, so it never grows past w+1 slots. All layers hold
    the same positions ``0..length-1`` for every row.
    """

    def __init__(self, model: TorchGPT, batch: int = 1) -> None:
        config = model.config
        self.limit = config.rope_len
        self.shape = (batch, config.n_kv_head, config.head_dim)
        self.dtype, self.device = model.dtype, model.device
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.capacity = dict.fromkeys(model.window_sizes, 0)  # slots per window size (None: full attention)
        # g9: the previous position's pre-smear embedding (B, 1, n_embd), and every id fed so far,
        # from which trim() rebuilds that embedding.
        self.smear = model.spec.smear
        self.smear_prev: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.shape[0]

    def plan(self, T: int) -> dict[int | None, Slots]:
        """How each window size's layers store and read ``T`` new positions (shared by those layers)."""
        start, end = self.length, self.length + T
        plans = {}
        for w in self.capacity:
            limit = self.limit if w is None else w + 1
            capacity = self._grown(self.capacity[w], min(end, limit), limit)
            self.capacity[w] = capacity
            if end <= limit:  # no slot is reused yet: the keys are slots 0..end-1 in order
                mask = None
                if T > 1 and start > 0:
                    mask = visible(self._arange(start, end), self._arange(0, end), None)
                plans[w] = Slots(mask, T > 1 and not start, capacity, write=slice(start, end), read=slice(0, end))
            elif T == 1:  # decode on a full ring: overwrite the oldest key, attend to all w+1
                slot = start % (w + 1)
                plans[w] = Slots(capacity=capacity, write=slice(slot, slot + 1))
            else:
                old = min(start, w + 1)
                slots = self._arange(0, old)
                # Slot s holds the latest position p < start with p % (w+1) == s.
                old_positions = start - 1 - torch.remainder(start - 1 - slots, w + 1)
                positions = torch.cat([old_positions, self._arange(start, end)])
                kept = min(T, w + 1)
                plans[w] = Slots(
                    visible(self._arange(start, end), positions, w),
                    capacity=capacity,
                    stored=False,
                    write=torch.remainder(self._arange(end - kept, end), w + 1),
                    old=old,
                    keep=slice(T - kept, T),
                )
        return plans

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values (B, Hkv, T, D); the keys and values to attend to."""
        kb, vb = self.keys[layer], self.values[layer]
        if kb is None or kb.shape[2] < slots.capacity:
            kb, vb = self._resize(kb, slots.capacity), self._resize(vb, slots.capacity)
            self.keys[layer], self.values[layer] = kb, vb
        if slots.stored:
            kb[:, :, slots.write] = k
            vb[:, :, slots.write] = v
            return kb[:, :, slots.read], vb[:, :, slots.read]
        keys = torch.cat([kb[:, :, : slots.old], k], 2) if slots.old else k
        values = torch.cat([vb[:, :, : slots.old], v], 2) if slots.old else v
        kb.index_copy_(2, slots.write, k[:, :, slots.keep])
        vb.index_copy_(2, slots.write, v[:, :, slots.keep])
        return keys, values

    def advance(self, ids: torch.Tensor) -> None:
        """Account for the positions of ``ids`` (B, T), stored by every layer."""
        T = ids.shape[1]
        if self.smear:
            if self.ids is None or self.ids.shape[1] < self.length + T:
                size = self._grown(0 if self.ids is None else self.ids.shape[1], self.length + T, self.limit)
                grown = torch.zeros(self.batch, size, dtype=ids.dtype, device=self.device)
                if self.ids is not None:
                    grown[:, : self.length] = self.ids[:, : self.length]
                self.ids = grown
            self.ids[:, self.length : self.length + T] = ids
        self.length += T

    def expand(self, n: int) -> KVCache:
        """Copy this one-row cache into ``n`` rows (the smear memory included)."""
        if self.batch != 1:
            raise ValueError(f"expand needs a one-row cache, this one has {self.batch} rows")
        self.keys = [None if t is None else t.repeat(n, 1, 1, 1) for t in self.keys]
        self.values = [None if t is None else t.repeat(n, 1, 1, 1) for t in self.values]
        self.smear_prev = None if self.smear_prev is None else self.smear_prev.repeat(n, 1, 1)
        self.ids = None if self.ids is None else self.ids.repeat(n, 1)
        self.shape = (n, *self.shape[1:])
        return self

    def trim(self, n: int) -> bool:
        """Forget the last ``n`` positions, unless a windowed layer already overwrote keys still needed.

        The caller rebuilds ``smear_prev`` (see ``TorchGPT.trim_cache``).
        """
        new = self.length - n
        if n < 0 or new < 0:
            return False
        for w in self.capacity:
            # A ring of w+1 slots holds positions >= length - w - 1; the next query needs those >= new - w.
            if w is not None and max(0, new - w) < max(0, self.length - w - 1):
                return False
        self.length = new
        return True

    def _arange(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device)

    @staticmethod
    def _grown(capacity: int, need: int, limit: int) -> int:
        if need <= capacity:
            return capacity
        size = max(need, capacity + capacity // 2)
        return min(limit, -(-size // CACHE_STEP) * CACHE_STEP)

    def _resize(self, buffer: torch.Tensor | None, slots: int) -> torch.Tensor:
        # Zeros rather than empty: slots not written yet are never attended to, but stay finite anyway.
        grown = torch.zeros(self.shape[0], self.shape[1], slots, self.shape[2], dtype=self.dtype, device=self.device)
        if buffer is not None:
            grown[:, :, : buffer.shape[2]] = buffer
        return grown


# --- the model ----------------------------------------------------------------------------------


class Linear(nn.Module):
    """A bias-free linear layer around given weights (nothing randomly initialized first)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = frozen(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:  # one row (decode): torch's CPU GEMV is ~1.4x faster in bf16
            return torch.mv(self.weight, x.reshape(-1)).reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight)


GEMV_ROWS = 16  # up to this many rows (decode, num_samples) Int8Linear runs the int8 kernel


class Int8Linear(nn.Module):
    """Weight-only int8: one scale per output row, activations stay in the compute dtype.

    Decoding reads every weight once per token, so a quarter of float32's bytes is up to 4x the
    memory-bound speed; torch's int8 kernel is fast with bfloat16/float16 activations.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.qweight = frozen(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.scales = frozen(scales.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > GEMV_ROWS:  # prefill: the int8 kernel is built for few rows; a dequantized
            return F.linear(x, self.qweight.to(x.dtype) * self.scales[:, None])  # GEMM is far faster
        y = torch._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scales)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_int8(model: nn.Module, min_inputs: int = 64) -> None:
    """Swap every Linear with at least ``min_inputs`` inputs for an Int8Linear (tiny gates stay)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear) and child.weight.shape[1] >= min_inputs:
                setattr(module, name, Int8Linear(child.weight))


def embedding(weight: torch.Tensor) -> nn.Embedding:
    return nn.Embedding.from_pretrained(weight, freeze=True)


class Attention(nn.Module):
    """Self-attention. ``c_qkv`` stacks the rows of c_q, c_k, c_v (and of the value-embedding gate)."""

    def __init__(
        self, weight: Callable[[str], torch.Tensor], i: int, config: ModelConfig, spec: ArchSpec, has_ve: bool
    ) -> None:
        super().__init__()
        self.layer = i
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.groups = config.n_head // config.n_kv_head
        prefix = f"transformer.h.{i}.attn."
        rows = [weight(f"{prefix}{name}.weight") for name in ("c_q", "c_k", "c_v")]
        if has_ve:
            # The gate reads the first ve_gate_channels of the normed input: zero columns make it
            # a matmul over the whole input, so it rides along with q, k and v.
            gate = weight(f"{prefix}ve_gate.weight")
            rows.append(F.pad(gate, (0, config.n_embd - gate.shape[1])))
        self.ve_scale = spec.ve_gate_scale
        self.c_qkv = Linear(torch.cat(rows))
        self.c_proj = Linear(weight(f"{prefix}c_proj.weight"))
        # q and k are each multiplied by qk_scale after QK-norm (g8/g9): fold both into SDPA's scale.
        self.scale = spec.qk_scale**2 / math.sqrt(self.head_dim)
        # Passing enable_gqa only when needed keeps torch < 2.5 working for models without GQA.
        self.gqa = {"enable_gqa": True} if self.groups > 1 else {}

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        slots: Slots,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        out = self.c_qkv(x)
        qk = out[..., : (H + Hkv) * D].view(B, T, H + Hkv, D)
        v = out[..., (H + Hkv) * D : (H + 2 * Hkv) * D].view(B, T, Hkv, D)
        if ve is not None:
            gate = self.ve_scale * torch.sigmoid(out[..., (H + 2 * Hkv) * D :])
            v = torch.addcmul(v, gate[..., None], ve.view(B, T, Hkv, D))
        # Rotary first, then QK-norm (the reference's order), q and k together. The tables hold
        # [cos, cos] and [sin, -sin], so rotating the halves by -theta is one roll and two products.
        cos, sin = rope
        qk = rms_norm(qk * cos + qk.roll(D // 2, -1) * sin)
        q, k, v = qk[:, :, :H], qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, slots)
        if T == 1 and self.groups > 1:
            # Decode with GQA: the query heads sharing a kv head become that head's query rows,
            # so the cached keys are read as they are, never repeated.
            y = F.scaled_dot_product_attention(q.reshape(B, Hkv, self.groups, D), k, v, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, attn_mask=slots.mask, is_causal=slots.causal, scale=self.scale, **self.gqa
            ).transpose(1, 2)
        return self.c_proj(y.reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, weight: Callable[[str], torch.Tensor], i: int) -> None:
        super().__init__()
        self.c_fc = Linear(weight(f"transformer.h.{i}.mlp.c_fc.weight"))
        self.c_proj = Linear(weight(f"transformer.h.{i}.mlp.c_proj.weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(
        self, weight: Callable[[str], torch.Tensor], i: int, config: ModelConfig, spec: ArchSpec, has_ve: bool
    ) -> None:
        super().__init__()
        self.attn = Attention(weight, i, config, spec, has_ve)
        self.mlp = MLP(weight, i)

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        slots: Slots,
        cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), ve, rope, slots, cache)
        return x + self.mlp(rms_norm(x))


class TorchGPT(nn.Module):
    """The nanochat GPT of one generation (``spec``) and geometry (``config``), inference only.

    ``model(ids, cache=None)`` takes int64 ids (B, T) and returns float32 logits (B, T, vocab_size).
    Parameters keep the canonical names, except each layer's fused ``attn.c_qkv`` and an
    ``lm_head`` without the padding rows; the scalar lambdas are plain floats.
    """

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        config, spec = ckpt.config, ckpt.spec
        self.config, self.spec, self.device, self.dtype = config, spec, device, dtype

        def weight(name: str) -> torch.Tensor:
            return to_torch(ckpt.weights[name], device, dtype)

        ve_layers = config.ve_layers(spec)
        blocks = [Block(weight, i, config, spec, i in ve_layers) for i in range(config.n_layer)]
        self.transformer = nn.ModuleDict(
            {"wte": embedding(weight("transformer.wte.weight")), "h": nn.ModuleList(blocks)}
        )
        # Rows past vocab_size (g2+ padding) never produce a logit: keep only the real ones.
        self.lm_head = Linear(weight("lm_head.weight")[: config.vocab_size])
        self.value_embeds = nn.ModuleDict({str(i): embedding(weight(f"value_embeds.{i}.weight")) for i in ve_layers})
        self.ve_keys = [str(i) if i in ve_layers else None for i in range(config.n_layer)]
        self.window_sizes = config.window_sizes(spec)

        def scalars(name: str) -> list[float]:
            # Python floats, rounded to the compute dtype first as the MLX model does.
            return [float(v) for v in weight(name).float().tolist()]

        if spec.lambdas:
            self.resid_lambdas, self.x0_lambdas = scalars("resid_lambdas"), scalars("x0_lambdas")
        if spec.smear:
            self.smear_gate = Linear(weight("smear_gate.weight"))
            self.smear_lambda = scalars("smear_lambda")[0]
        self.backout_layer = config.n_layer // 2 if spec.backout else None
        if spec.backout:
            self.backout_lambda = scalars("backout_lambda")[0]
        cos, sin = rotary_tables(config.head_dim, config.rope_len, spec.rope_base, spec.rope_table_bf16)
        # [cos, cos] and [sin, -sin]: the rotation of both halves is then x * cos + roll(x) * sin.
        for name, table in (("cos", np.concatenate([cos, cos], 1)), ("sin", np.concatenate([sin, -sin], 1))):
            self.register_buffer(name, torch.from_numpy(table).to(device, dtype), persistent=False)

    def make_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self, batch)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The normed token embedding (before g9's smear)."""
        return rms_norm(self.transformer.wte(ids))

    @torch.inference_mode()
    def trim_cache(self, cache: KVCache, n: int) -> bool:
        """Drop the last ``n`` positions of ``cache`` if it can; g9's smear memory is rebuilt."""
        if not cache.trim(n):
            return False
        if cache.smear and n:
            length = cache.length
            cache.smear_prev = self.embed(cache.ids[:, length - 1 : length]) if length else None
        return True

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size) for ids (B, T); ``last_only`` keeps just the last position (prefill)."""
        ids = ids.to(self.device)
        B, T = ids.shape
        offset = cache.length if cache is not None else 0
        if offset + T > self.config.rope_len:
            raise NanochatError(
                f"context of {offset + T} tokens exceeds the model's limit of {self.config.rope_len} "
                f"(10 x sequence_len {self.config.sequence_len})"
            )
        if cache is not None and cache.batch != B:
            raise ValueError(f"the cache holds {cache.batch} rows, the input has {B}")
        x = self.embed(ids)
        if self.spec.smear:
            x = self._smear(x, cache)
        x0 = x
        rope = self.cos[offset : offset + T, None], self.sin[offset : offset + T, None]  # (T, 1, D) views
        plans = cache.plan(T) if cache is not None else self._plan(T)
        x_mid = None
        for i, block in enumerate(self.transformer.h):
            if self.spec.lambdas:
                x = x * self.resid_lambdas[i] + x0 * self.x0_lambdas[i]
            key = self.ve_keys[i]
            ve = self.value_embeds[key](ids) if key is not None else None
            x = block(x, ve, rope, plans[self.window_sizes[i]], cache)
            if i == self.backout_layer:
                x_mid = x
        if cache is not None:
            cache.advance(ids)
        if x_mid is not None:
            x = x - self.backout_lambda * x_mid
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(rms_norm(x)).float()
        # Softcap in place: the logits are a fresh tensor, and vocabulary-sized temporaries cost
        # more than the arithmetic (each new one is fresh memory to fault in).
        cap = self.spec.softcap
        return logits.div_(cap).tanh_().mul_(cap)

    def _plan(self, T: int) -> dict[int | None, Slots]:
        """Masks of a forward pass without a cache: causal, or causal within the window."""
        plans = {}
        for w in set(self.window_sizes):
            if w is None or T <= w + 1:
                plans[w] = Slots(causal=T > 1)
            else:
                positions = torch.arange(T, device=self.device)
                plans[w] = Slots(visible(positions, positions, w))
        return plans

    def _smear(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Mix each position's normed embedding with its predecessor's (g9)."""
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., : self.spec.smear_channels]))
        prev = cache.smear_prev if cache is not None else None
        if cache is not None:
            cache.smear_prev = x[:, -1:].clone()
        if prev is not None:
            return x + gate * torch.cat([prev, x[:, :-1]], 1)
        if x.shape[1] == 1:
            return x  # position 0 has no predecessor
        return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], 1)


def build_torch_model(ckpt: Checkpoint, dtype: str | None = None, quantize: int | None = None) -> TorchGPT:
    """The torch model for ``ckpt`` on the best device (CUDA, then MPS, then the CPU).

    ``quantize=8`` stores the linear layers as weight-only int8 (bfloat16 activations by default).
    """
    if ckpt.quantization:
        raise NanochatError(f"{ckpt.name}: quantized MLX folders run on the MLX backend only")
    if quantize not in (None, 8):
        raise NanochatError("the torch backend quantizes to 8 bits (weight-only int8); 4-bit runs on MLX")
    device = default_device()
    dtype = dtype or ("bfloat16" if quantize else default_dtype(device))
    if dtype not in TORCH_DTYPES:
        raise NanochatError(f"unknown dtype {dtype!r} (choose {', '.join(TORCH_DTYPES)})")
    if quantize and dtype == "float32":  # torch's int8 kernel is ~4x slower with float32 activations
        raise NanochatError("weight-only int8 runs with bfloat16 or float16 activations; drop --dtype float32")
    model = TorchGPT(ckpt, device, TORCH_DTYPES[dtype]).eval()
    if quantize:
        quantize_int8(model)
        model.quantization = quantize
        try:  # fail at load, not mid-reply, where this torch/device has no int8 kernel
            with torch.inference_mode():
                model(torch.tensor([[0, 1]], device=device))
        except (RuntimeError, NotImplementedError) as e:
            raise NanochatError(f"no weight-only int8 kernel on {device} (torch {torch.__version__}): {e}") from e
    return model


# --- sampling -----------------------------------------------------------------------------------


def penalize(logits: torch.Tensor, histories: list[list[int]], penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of each row's recent tokens by ``penalty``."""
    logits = logits.clone()
    for row, history in enumerate(histories):
        ids = torch.tensor(sorted(set(history[-REPETITION_CONTEXT:])), dtype=torch.long, device=logits.device)
        if ids.numel():
            chosen = logits[row, ids]
            logits[row, ids] = torch.where(chosen < 0, chosen * penalty, chosen / penalty)
    return logits


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores to sample from with ``softmax(scores / temperature)`` (dropped tokens: -inf), and their ids.

    Top-p, min-p and top-k each keep a prefix of the tokens ordered by probability, so only the
    top-k (or, without top-k, all tokens sorted) need ordering; top-p is measured on the full
    distribution, as the MLX runner does. Without any filter: the logits themselves, ids None.
    """
    vocab = logits.shape[-1]
    top_k = params.top_k if params.top_k and params.top_k < vocab else None
    if top_k is None and params.top_p >= 1.0 and params.min_p <= 0.0:
        return logits, None
    scores, ids = logits.topk(top_k, -1) if top_k else logits.sort(-1, descending=True)
    if params.top_p < 1.0:
        probs = (scores - logits.logsumexp(-1, keepdim=True)).exp()
        # Keep a token while the mass of the more likely ones is below top_p (the first always).
        scores = scores.masked_fill(probs.cumsum(-1) - probs >= params.top_p, -math.inf)
    if params.min_p > 0.0:  # p >= min_p * p_max, in logits
        scores = scores.masked_fill(scores < scores[..., :1] + math.log(params.min_p), -math.inf)
    return scores, ids


# --- the engine's runner ------------------------------------------------------------------------


class TorchRunner:
    """The engine's view of a torch model: forward passes and sampling stay on the device."""

    name = "torch"

    def __init__(self, model: TorchGPT) -> None:
        self.model = model
        self.device = device_name(model.device)
        self.dtype = {v: k for k, v in TORCH_DTYPES.items()}[model.dtype]
        self.context_limit = model.config.rope_len

    def make_cache(self) -> KVCache:
        return self.model.make_cache()

    def cache_length(self, cache: KVCache) -> int:
        return cache.length

    def prefill(self, tokens: list[int], cache: KVCache) -> torch.Tensor:
        ids = torch.tensor([tokens], dtype=torch.long, device=self.model.device)
        return self.model(ids, cache=cache, last_only=True)[:, -1]

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model(tokens[:, None], cache=cache)[:, -1]

    @torch.inference_mode()
    def expand(self, cache: KVCache, logits: torch.Tensor, n: int) -> tuple[KVCache, torch.Tensor]:
        """Copy a one-row cache (and its logits) into ``n`` rows, as the reference's KVCache.prefill."""
        return cache.expand(n), logits.repeat(n, 1)

    def sampler(self, params: SamplingParams) -> Callable[[torch.Tensor, list[list[int]] | None], torch.Tensor]:
        """(logits (B, V), row histories or None) -> ids (B,) on the device."""
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        penalty = params.repetition_penalty

        @torch.inference_mode()
        def sample(logits: torch.Tensor, histories: list[list[int]] | None) -> torch.Tensor:
            if penalty != 1.0 and histories:
                logits = penalize(logits, histories, penalty)
            if params.greedy:
                return logits.argmax(-1)  # the first maximum, as the reference
            scores, ids = candidates(logits, params)
            probs = torch.softmax(scores / params.temperature, -1)
            choice = torch.multinomial(probs, 1, generator=generator)
            return (choice if ids is None else ids.gather(-1, choice))[:, 0]

        return sample

    def tokens(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.model.device)

    def schedule(self, ids: torch.Tensor) -> None:
        """Nothing to do: CUDA already runs queued kernels asynchronously; to_list waits for them."""

    def to_list(self, ids: torch.Tensor) -> list[int]:
        return ids.tolist()

    def trim(self, cache: KVCache, n: int) -> bool:
        return self.model.trim_cache(cache, n)

    def reset_peak_memory(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.model.device)

    def peak_memory(self) -> int:
        """Peak CUDA allocation; Metal's current allocation; on the CPU the process's peak RSS."""
        kind = self.model.device.type
        if kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self.model.device))
        if kind == "mps":
            return int(torch.mps.driver_allocated_memory())
        if resource is None:
            return 0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB
