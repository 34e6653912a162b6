"""The nanochat GPT in PyTorch (CUDA, MPS or CPU).

It computes what ``backends/mlx/model.py`` computes, for every generation, from the same ``Checkpoint``
(canonical weights, ``ArchSpec``, ``ModelConfig``). Two layout choices keep decoding lean:

- each layer's q, k, v projections (and its value-embedding gate, zero-padded to the full width)
  are concatenated into one matrix at load time, so a layer runs one input matmul, and q and k
  are rotated and normed together;
- ``KVCache`` is preallocated: full-attention layers store position p in slot p and grow in steps,
  windowed layers (query i sees keys i-w..i) store p in slot p % (w+1) and never hold more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint import Checkpoint
from ...config import RMS_EPS, ArchSpec, ModelConfig
from ...errors import NanochatError
from ...rope import rotary_tables
from .cache import KVCache, Slots, visible

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        self.ve_channels = spec.ve_gate_channels if has_ve else 0

    def split(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a ``c_qkv``-shaped tensor (the weight or its gradient) as c_q, c_k, c_v (and ve_gate)."""
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        parts = {"c_q": fused[:q], "c_k": fused[q : q + kv], "c_v": fused[q + kv : q + 2 * kv]}
        if self.ve_channels:
            parts["ve_gate"] = fused[q + 2 * kv :, : self.ve_channels]
        return parts

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
    """The nanochat GPT of one generation (``spec``) and geometry (``config``).

    ``model(ids, cache=None)`` takes int64 ids (B, T) and returns float32 logits (B, T, vocab_size).
    Parameters keep the canonical names and shapes, except each layer's fused ``attn.c_qkv``
    (``canonical`` maps them back). They are frozen; training unfreezes them and calls ``compute``.
    """

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        config, spec = ckpt.config, ckpt.spec
        self.config, self.spec, self.device, self.dtype = config, spec, device, dtype
        self.quantization: int | None = None  # bits, once quantized

        def weight(name: str) -> torch.Tensor:
            return to_torch(ckpt.weights[name], device, dtype)

        ve_layers = config.ve_layers(spec)
        blocks = [Block(weight, i, config, spec, i in ve_layers) for i in range(config.n_layer)]
        self.transformer = nn.ModuleDict(
            {"wte": embedding(weight("transformer.wte.weight")), "h": nn.ModuleList(blocks)}
        )
        # Rows past vocab_size (g2+ padding) never produce a logit, but they are kept (the logits
        # are sliced) so that the weights stay those of the checkpoint, as training needs.
        self.lm_head = Linear(weight("lm_head.weight"))
        self.value_embeds = nn.ModuleDict({str(i): embedding(weight(f"value_embeds.{i}.weight")) for i in ve_layers})
        self.ve_keys = [str(i) if i in ve_layers else None for i in range(config.n_layer)]
        self.window_sizes = config.window_sizes(spec)

        if spec.lambdas:
            self.resid_lambdas, self.x0_lambdas = frozen(weight("resid_lambdas")), frozen(weight("x0_lambdas"))
        if spec.smear:
            self.smear_gate = Linear(weight("smear_gate.weight"))
            self.smear_lambda = frozen(weight("smear_lambda"))
        self.backout_layer = config.n_layer // 2 if spec.backout else None
        if spec.backout:
            self.backout_lambda = frozen(weight("backout_lambda"))
        cos, sin = rotary_tables(config.head_dim, config.rope_len, spec.rope_base, spec.rope_table_bf16)
        # [cos, cos] and [sin, -sin]: the rotation of both halves is then x * cos + roll(x) * sin.
        for name, table in (("cos", np.concatenate([cos, cos], 1)), ("sin", np.concatenate([sin, -sin], 1))):
            self.register_buffer(name, torch.from_numpy(table).to(device, dtype), persistent=False)

    def make_runner(self):
        """The engine's runner for this model."""
        from .runner import TorchRunner

        return TorchRunner(self)

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

    def canonical(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors named like this model's parameters (the parameters, or their gradients) under
        the canonical names and shapes: each ``attn.c_qkv`` split into views, the rest as they are."""
        out = {}
        for name, tensor in tensors.items():
            if name.endswith(".attn.c_qkv.weight"):
                prefix = name.removesuffix("c_qkv.weight")
                layer = self.transformer.h[int(name.split(".")[2])].attn
                out.update({f"{prefix}{part}.weight": view for part, view in layer.split(tensor).items()})
            else:
                out[name] = tensor
        return out

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size) for ids (B, T); ``last_only`` keeps just the last position (prefill)."""
        return self.compute(ids, cache, last_only)

    def compute(self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """``forward`` outside inference mode, so that gradients can flow (training)."""
        ids = ids.to(self.device)
        B, T = ids.shape
        offset = cache.length if cache is not None else 0
        self.config.check_context(offset + T)
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
        logits = self.lm_head(rms_norm(x))[..., : self.config.vocab_size].float()
        cap = self.spec.softcap
        if logits.requires_grad:
            return cap * torch.tanh(logits / cap)
        # Softcap in place: the logits are a fresh tensor, and vocabulary-sized temporaries cost
        # more than the arithmetic (each new one is fresh memory to fault in).
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
