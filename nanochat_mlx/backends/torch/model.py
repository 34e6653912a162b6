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

import itertools
import math
import statistics
import time
import warnings
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
from ...weights import nonfinite_error, release_pages
from .cache import KVCache, RowPlan, Slots, visible

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
    """A canonical numpy tensor (bfloat16 via ml_dtypes included, bit-exact) on ``device`` in ``dtype``.

    One tensor at a time, so loading never holds more than the model so far plus one tensor: the
    cast reads the (often memory-mapped, read-only) array directly into a tensor of its own, and the
    file pages it read are then released from this process.
    """
    bf16 = array.dtype == ml_dtypes.bfloat16
    with warnings.catch_warnings():  # read-only source: the tensor below is only read, into a copy
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(array.view(np.int16) if bf16 else array)
    if bf16:
        host = host.view(torch.bfloat16)
    out = host.to(device=device, dtype=dtype, copy=True)
    release_pages(array)
    return out


def finite(t: torch.Tensor, name: str, origin: str) -> torch.Tensor:
    """``t``, once it is known to hold no NaN or infinity (as in ``mlx.model._finite``)."""
    if t.is_floating_point() and not torch.isfinite(t.sum()):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            raise nonfinite_error(origin, name, nan, inf, t.numel())
    return t


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm with the reference's eps (torch.finfo(float32).eps, in every dtype)."""
    return F.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)


def frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


# --- the model ----------------------------------------------------------------------------------


def _linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _mv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], -1)


def _numpy(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """numpy's BLAS (OpenBLAS) over the tensors' own memory: no copy either way."""
    return torch.from_numpy(weight.numpy() @ x.reshape(-1).numpy()).view(*x.shape[:-1], -1)


# One-row products (decode) have several kernels whose speed depends on the machine and dtype:
# choose_gemv measures them on the model's own weights at load time.
GEMV_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": _linear,
    "mv": _mv,
    "numpy": _numpy,
}


def _slices(nbytes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """F.linear over slices of the weight's rows of about ``nbytes`` each, concatenated."""

    def product(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The CPU GEMM packs the whole weight before using it when x has a few rows, which costs
        # more memory traffic than the product; slices that stay in cache make it about one read.
        step = max(16, nbytes // (weight.shape[1] * weight.element_size()))
        return torch.cat([F.linear(x, weight[i : i + step]) for i in range(0, weight.shape[0], step)], -1)

    product.__name__ = f"_slices_{nbytes >> 10}k"
    return product


def _transposed(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(W x^T)^T: the GEMM's long side is then the weight's rows, which it streams as they are."""
    rows = x.reshape(-1, x.shape[-1])
    return torch.mm(weight, rows.t()).t().contiguous().view(*x.shape[:-1], -1)


# Products of a few rows (batched decode: a server's rows, n samples) on the CPU: which kernel wins
# depends on the row count, the machine and the thread count (d12 float32 on a 2-core Xeon, one
# thread: F.linear for 2 rows, 256 KiB slices for 8, the transposed GEMM for 16), so
# choose_batch_kernels measures them per row count where a server will batch.
BATCH_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": _linear,
    "slices-1m": _slices(1 << 20),
    "slices-256k": _slices(1 << 18),
    "transposed": _transposed,
}
BATCH_ROWS = 32  # up to this many rows the CPU product runs one of BATCH_KERNELS
DEFAULT_BATCH_KERNEL = "slices-1m"  # before (or without) choose_batch_kernels


def row_bucket(rows: int) -> int:
    """The power of two at or above ``rows``: products of 5 to 8 rows share one measured kernel."""
    return 1 << (rows - 1).bit_length()


class Linear(nn.Module):
    """A bias-free linear layer around given weights (nothing randomly initialized first)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.gemv = _linear  # the one-row kernel, set by choose_gemv
        self.batched: dict[int, Callable] = {}  # row bucket -> few-row kernel, set by choose_batch_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 1:  # one row (decode): the kernel measured fastest for this shape
            return self.gemv(self.weight, x)
        if rows <= BATCH_ROWS and x.device.type == "cpu":
            kernel = self.batched.get(row_bucket(rows)) or BATCH_KERNELS[DEFAULT_BATCH_KERNEL]
            return kernel(self.weight, x)
        return F.linear(x, self.weight)


def gemv_candidates(weight: torch.Tensor) -> list[str]:
    """The one-row kernels choose_gemv measures for ``weight`` on its device.

    numpy (OpenBLAS) is only run when asked for: timed alone it can look fastest, but inside a
    decode step its own thread pool fights torch's (d12 float32 on a 2-core Xeon: 1.5 tok/s against
    12.4 with F.linear, while the isolated timing preferred it for two shapes).
    """
    return ["linear", "mv"] if weight.device.type == "cpu" else ["linear"]


def time_products(
    modules: list[Linear], kernels: dict[str, Callable], rows: int = 1, rounds: int = 2
) -> dict[tuple[int, int], dict[str, float]]:
    """Median seconds per shape and kernel of ``rows``-row products over ``modules`` in model order.

    Each round runs every kernel over all the modules in turn, as a decode step reads them: the
    weights come from wherever a decode step finds them (memory, or a large last-level cache for a
    small model), where one matrix timed repeatedly would sit in the core's own cache. Round 0
    warms each kernel up (first-call costs, lazy initialization).
    """
    inputs = {}
    for m in modules:
        w = m.weight
        inputs.setdefault(w.shape[1], torch.randn(1, rows, w.shape[1], dtype=w.dtype, device=w.device))
    times: dict[tuple[int, int], dict[str, list[float]]] = {}
    for r in range(rounds + 1):
        for name, kernel in kernels.items():
            spent: dict[tuple[int, int], float] = {}
            for m in modules:
                shape = tuple(m.weight.shape)
                t = time.perf_counter()
                kernel(m.weight, inputs[shape[1]])
                spent[shape] = spent.get(shape, 0.0) + time.perf_counter() - t
            if r:
                for shape, seconds in spent.items():
                    times.setdefault(shape, {}).setdefault(name, []).append(seconds)
    return {shape: {name: statistics.median(ts) for name, ts in by.items()} for shape, by in times.items()}


def fastest(timed: dict[str, float]) -> str:
    return min(timed, key=timed.__getitem__)


@torch.inference_mode()
def choose_gemv(model: nn.Module, kernel: str | None = None) -> dict[tuple[int, int], str]:
    """Give every Linear the fastest one-row kernel for its shape on this machine (or ``kernel``).

    Decode is a chain of matrix-vector products that read every weight once, so the kernel that
    streams memory fastest wins; which one that is varies with the CPU, dtype and thread count
    (torch.mv beats F.linear by a third in bfloat16 on an AMX Xeon, at 1 and 2 threads, and loses
    on an AMD Zen 4; in float32 both run at the memory's speed). Every shape is timed on all of
    the model's matrices of that shape, in one pass over the model per kernel (``time_products``).
    """
    modules = [m for m in model.modules() if isinstance(m, Linear)]
    shapes = {tuple(m.weight.shape): m.weight for m in modules}
    names = {shape: gemv_candidates(w) for shape, w in shapes.items()}
    if kernel is not None:  # numpy runs float32 CPU tensors only
        cpu32 = {shape: w.device.type == "cpu" and w.dtype == torch.float32 for shape, w in shapes.items()}
        chosen = {s: kernel if kernel in names[s] or (kernel == "numpy" and cpu32[s]) else "linear" for s in shapes}
    else:
        candidates = sorted({name for n in names.values() for name in n}, key=list(GEMV_KERNELS).index)
        kernels = {name: GEMV_KERNELS[name] for name in candidates}
        timed = time_products(modules, kernels) if len(candidates) > 1 else {}
        chosen = {s: fastest(timed[s]) if s in timed else names[s][0] for s in shapes}
    for m in modules:
        m.gemv = GEMV_KERNELS[chosen[tuple(m.weight.shape)]]
    return chosen


@torch.inference_mode()
def choose_batch_kernels(model: nn.Module, max_rows: int) -> dict[int, dict[tuple[int, int], str]]:
    """Give every Linear the fastest few-row kernel per row bucket up to ``max_rows`` (CPU only).

    A server decoding up to ``max_rows`` rows at once calls this once after loading: each bucket
    (2, 4, 8, ...) is timed with every BATCH_KERNELS candidate in passes over the whole model, as
    choose_gemv times one row. Returns bucket -> shape -> kernel name (empty off the CPU).
    """
    modules = [m for m in model.modules() if isinstance(m, Linear)]
    if not modules or modules[0].weight.device.type != "cpu":
        return {}
    chosen = {}
    for bucket in sorted({row_bucket(r) for r in range(2, min(max_rows, BATCH_ROWS) + 1)}):
        timed = time_products(modules, BATCH_KERNELS, rows=bucket)
        chosen[bucket] = {shape: fastest(by) for shape, by in timed.items()}
        for m in modules:
            m.batched[bucket] = BATCH_KERNELS[chosen[bucket][tuple(m.weight.shape)]]
    return chosen


GEMV_ROWS = 16  # up to this many rows (decode, num_samples) the packed low-bit kernels run


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


INT4_GROUP = 128  # inputs per scale/zero pair
INT4_BLOCK = 64  # output rows per block of the CPU kernel's packed layout (rows are padded to whole blocks)


def _unpack_int4_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The (n, k) 4-bit codes of ``torch._convert_weight_to_int4pack_for_cpu``'s layout, as uint8.

    For each block of 64 rows and each input k, 32 bytes hold rows j (low nibble) and j+32 (high).
    """
    blocks = packed.view(n // INT4_BLOCK, k, INT4_BLOCK // 2)
    codes = torch.cat([blocks & 15, blocks >> 4], -1)  # (n/64, k, 64)
    return codes.transpose(1, 2).reshape(n, k)


class Int4Linear(nn.Module):
    """Weight-only 4-bit: a bfloat16 scale and zero per group of 128 inputs of each output row.

    One-row products run torch's packed int4 kernel (an eighth of float32's bytes); prefill unpacks
    and dequantizes to a bfloat16 GEMM, which is far faster for many rows. Output rows are padded
    with zeros to whole kernel blocks and cut off again.
    """

    def __init__(self, weight: torch.Tensor, group_size: int = INT4_GROUP) -> None:
        super().__init__()
        n, k = weight.shape
        self.out_features, self.group_size = n, group_size
        w = F.pad(weight.float(), (0, 0, 0, -n % INT4_BLOCK))
        groups = w.view(w.shape[0], k // group_size, group_size)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        # The kernel computes (q - 8) * scale + zero: quantize against the bfloat16-rounded pair it uses.
        scales = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
        zeros = (lo + 8 * scales).to(torch.bfloat16).float()
        codes = torch.round((groups - zeros) / scales + 8).clamp(0, 15).to(torch.int32).view(w.shape)
        self.scales_zeros = frozen(torch.cat([scales, zeros], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.device_type = weight.device.type
        if self.device_type == "cpu":
            self.qweight = frozen(torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        else:  # CUDA's tinygemm layout from two codes per byte
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            self.qweight = frozen(torch._convert_weight_to_int4pack(pairs, 8))

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        if self.device_type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size, self.scales_zeros)
        return torch._weight_int4pack_mm(rows, self.qweight, self.group_size, self.scales_zeros)

    def dequantized(self) -> torch.Tensor:
        """The (padded) bfloat16 weight the kernel multiplies by (CPU layout)."""
        n, k = self.scales_zeros.shape[1], self.qweight.shape[1] * 2
        codes = _unpack_int4_cpu(self.qweight, n, k).view(n, k // self.group_size, self.group_size)
        scales, zeros = self.scales_zeros.transpose(0, 1).unbind(-1)
        return ((codes.to(torch.bfloat16) - 8) * scales[..., None] + zeros[..., None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > GEMV_ROWS and self.device_type == "cpu":
            y = F.linear(rows, self.dequantized().to(x.dtype))
        else:
            y = self._kernel(rows.contiguous())
        return y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)


QUANTIZED = {8: Int8Linear, 4: Int4Linear}


def quantizable(weight: torch.Tensor, bits: int) -> bool:
    """Whether a weight is worth (int8: 64+ inputs) and able (int4: whole groups) to be quantized."""
    inputs = weight.shape[1]
    return inputs % INT4_GROUP == 0 if bits == 4 else inputs >= 64


def quantize_linears(module: nn.Module, bits: int) -> nn.Module:
    """``module`` with every quantizable Linear in it (or itself) swapped for its ``bits``-bit version."""
    if isinstance(module, Linear):
        return QUANTIZED[bits](module.weight) if quantizable(module.weight, bits) else module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and quantizable(child.weight, bits):
                setattr(parent, name, QUANTIZED[bits](child.weight))
    return module


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def plain_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of a few query rows over all cached keys as matmul, float32 softmax, matmul: on some
    CPUs torch's SDPA streams half-precision keys at a fraction of what a plain matmul does."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


@torch.inference_mode()
def choose_decode_attention(model: nn.Module, keys: int = 1024, rounds: int = 5) -> str:
    """Give every Attention the faster of SDPA and the plain path for one-token half-precision decode,
    timed on this machine with the model's head shapes over ``keys`` cached positions."""
    c = model.config
    if model.device.type != "cpu" or model.dtype == torch.float32:
        return "sdpa"  # float32 keeps SDPA, the parity path; GPUs have fused kernels
    q = torch.randn(1, c.n_kv_head, c.n_head // c.n_kv_head, c.head_dim, dtype=model.dtype)
    k, v = (torch.randn(1, c.n_kv_head, keys, c.head_dim, dtype=model.dtype) for _ in range(2))
    times: dict[str, list[float]] = {"sdpa": [], "plain": []}
    for _ in range(rounds):
        for name, fn in (("sdpa", sdpa_decode), ("plain", plain_decode)):
            t = time.perf_counter()
            fn(q, k, v, 1.0)
            times[name].append(time.perf_counter() - t)
    chosen = min(times, key=lambda name: statistics.median(times[name]))
    for module in model.modules():
        if isinstance(module, Attention):
            module.decode_attention = plain_decode if chosen == "plain" else sdpa_decode
    return chosen


def embedding(weight: torch.Tensor) -> nn.Embedding:
    return nn.Embedding.from_pretrained(weight, freeze=True)


class Attention(nn.Module):
    """Self-attention. ``c_qkv`` stacks the rows of c_q, c_k, c_v (and of the value-embedding gate)."""

    def __init__(
        self, weight: Callable[[str], torch.Tensor], i: int, config: ModelConfig, spec: ArchSpec, has_ve: bool
    ) -> None:
        super().__init__()
        self.layer = i
        self.window = config.window_sizes(spec)[i]  # which of a row's plans this layer follows
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
        self.decode_attention = sdpa_decode  # one-token decode; choose_decode_attention may swap it

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
        slots: Slots | list[RowPlan],  # a list: one plan per row (decode_rows)
        cache: KVCache | list[KVCache] | None,
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
        if isinstance(cache, list):  # rows stepped together: each attends to its own cache
            # Every position is its own batch row here (N, 1, ...); a row's n positions are
            # consecutive, and become one sequence (1, n, ...) against that row's cache.
            ys, start = [], 0
            for row, plan in zip(cache, slots, strict=True):
                end = start + plan.length
                row_slots = plan.plans[self.window]
                q_i = q[start:end].transpose(0, 1)
                k_i, v_i = row.update(self.layer, k[start:end].transpose(0, 2), v[start:end].transpose(0, 2), row_slots)
                if plan.length == 1:  # a GQA decode gives (1, Hkv, groups, D): the same heads in order
                    ys.append(self._decode_attention(q_i, k_i, v_i).reshape(1, 1, H, D))
                else:
                    ys.append(self._attend(q_i, k_i, v_i, row_slots))
                start = end
            y = torch.cat(ys, 1).transpose(0, 1)
        elif T == 1:
            if cache is not None:
                k, v = cache.update(self.layer, k, v, slots)
            y = self._decode_attention(q, k, v)
        else:
            if cache is not None:
                k, v = cache.update(self.layer, k, v, slots)
            y = self._attend(q, k, v, slots)
        return self.c_proj(y.reshape(B, T, H * D))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: Slots) -> torch.Tensor:
        """Several query positions (B, T, H, D) against keys (B, Hkv, S, D), masked as ``slots`` says."""
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=slots.mask, is_causal=slots.causal, scale=self.scale, **self.gqa
        ).transpose(1, 2)

    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query position (B, 1, H, D) against cached keys (B, Hkv, S, D), every key visible."""
        B, _, H, D = q.shape
        if self.groups > 1 or self.decode_attention is not sdpa_decode:
            # The query heads sharing a kv head become that head's query rows, so the cached keys
            # are read as they are, never repeated (the plain path, where chosen, as well).
            return self.decode_attention(q.reshape(B, self.n_kv_head, self.groups, D), k, v, self.scale)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, scale=self.scale, **self.gqa).transpose(1, 2)


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
        slots: Slots | list[RowPlan],  # a list: one plan per row (decode_rows)
        cache: KVCache | list[KVCache] | None,
    ) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), ve, rope, slots, cache)
        return x + self.mlp(rms_norm(x))


class TorchGPT(nn.Module):
    """The nanochat GPT of one generation (``spec``) and geometry (``config``).

    ``model(ids, cache=None)`` takes int64 ids (B, T) and returns float32 logits (B, T, vocab_size).
    Parameters keep the canonical names and shapes, except each layer's fused ``attn.c_qkv``
    (``canonical`` maps them back). They are frozen; training unfreezes them and calls ``compute``.
    """

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, quantize: int | None = None) -> None:
        super().__init__()
        config, spec = ckpt.config, ckpt.spec
        self.config, self.spec, self.device, self.dtype = config, spec, device, dtype
        self.quantization = quantize  # bits of the linear layers' weights, None = the compute dtype

        def weight(name: str) -> torch.Tensor:
            return finite(to_torch(ckpt.weights[name], device, dtype), name, ckpt.name)

        def quantized(module: nn.Module) -> nn.Module:
            # Layer by layer, so the unquantized weights of only one layer exist at a time.
            return quantize_linears(module, quantize) if quantize else module

        ve_layers = config.ve_layers(spec)
        blocks = [quantized(Block(weight, i, config, spec, i in ve_layers)) for i in range(config.n_layer)]
        self.transformer = nn.ModuleDict(
            {"wte": embedding(weight("transformer.wte.weight")), "h": nn.ModuleList(blocks)}
        )
        # Rows past vocab_size (g2+ padding) never produce a logit, but they are kept (the logits
        # are sliced) so that the weights stay those of the checkpoint, as training needs.
        self.lm_head = quantized(Linear(weight("lm_head.weight")))
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
        rope = self.cos[offset : offset + T, None], self.sin[offset : offset + T, None]  # (T, 1, D) views
        plans = cache.plan(T) if cache is not None else self._plan(T)
        layer_plans = [plans[w] for w in self.window_sizes]
        logits = self._trunk(ids, x, rope, layer_plans, cache, last_only)
        if cache is not None:
            cache.advance(ids)
        return logits

    @torch.inference_mode()
    def decode_rows(self, ids: torch.Tensor, rows: list[KVCache], lengths: list[int] | None = None) -> torch.Tensor:
        """One step of B independent rows: row b is fed the next ``lengths[b]`` ids (default 1 each)
        of ``ids`` (N,) on its own one-row cache ``rows[b]``. Logits (B, V) of each row's last id.

        Each row keeps its own position, sliding windows and smear state; the matrix products run
        once for all N positions, attention once per row over that row's own keys. A row fed
        several ids is a prompt chunk riding along with the decoding rows: its prefill shares
        their weight reads (on a memory-bound device, nearly for free).
        """
        lengths = lengths or [1] * len(rows)
        spans = list(itertools.pairwise(itertools.accumulate(lengths, initial=0)))  # row b's ids: [start, end)
        ids = ids.to(self.device)[:, None]  # (N, 1): every position its own row of the products
        positions = []
        for row, n in zip(rows, lengths, strict=True):
            self.config.check_context(row.length + n)
            positions.extend(range(row.length, row.length + n))
        x = self.embed(ids)
        if self.spec.smear:  # x + gate * the previous position's embedding, as _smear, row by row
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., : self.spec.smear_channels]))
            prev = []
            for row, (start, end) in zip(rows, spans, strict=True):
                # A row's position 0 has no predecessor: adding gate * 0 leaves it as it is.
                prev += [torch.zeros_like(x[:1]) if row.smear_prev is None else row.smear_prev, x[start : end - 1]]
                row.smear_prev = x[end - 1 : end].clone()
            x = x + gate * torch.cat(prev)
        index = torch.tensor(positions, device=self.device)
        rope = self.cos[index][:, None, None], self.sin[index][:, None, None]  # (N, 1, 1, D)
        plans = [RowPlan(n, row.plan(n)) for row, n in zip(rows, lengths, strict=True)]
        last = None if len(positions) == len(rows) else [end - 1 for _, end in spans]
        logits = self._trunk(ids, x, rope, [plans] * len(self.window_sizes), rows, False, last)
        for row, (start, end) in zip(rows, spans, strict=True):
            row.advance(ids[start:end].view(1, -1))
        return logits[:, -1]

    def _trunk(self, ids, x, rope, layer_plans, cache, last_only: bool, take: list[int] | None = None) -> torch.Tensor:
        """The blocks, backout, final norm, head and softcap on the normed (smeared) embedding ``x``;
        the head runs on the last position only (``last_only``) or on the batch rows ``take``."""
        x0 = x
        x_mid = None
        for i, block in enumerate(self.transformer.h):
            if self.spec.lambdas:
                x = x * self.resid_lambdas[i] + x0 * self.x0_lambdas[i]
            key = self.ve_keys[i]
            ve = self.value_embeds[key](ids) if key is not None else None
            x = block(x, ve, rope, layer_plans[i], cache)
            if i == self.backout_layer:
                x_mid = x
        if x_mid is not None:
            x = x - self.backout_lambda * x_mid
        if last_only:
            x = x[:, -1:]
        if take is not None:
            x = x[take]
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


def build_torch_model(
    ckpt: Checkpoint, dtype: str | None = None, quantize: int | None = None, gemv: str | None = None
) -> TorchGPT:
    """The torch model for ``ckpt`` on the best device (CUDA, then MPS, then the CPU).

    ``quantize=8|4`` stores the linear layers as weight-only int8 / grouped int4 (bfloat16
    activations). ``gemv`` forces one one-row kernel (``GEMV_KERNELS``) instead of measuring them.
    """
    if ckpt.quantization:
        raise NanochatError(f"{ckpt.name}: quantized MLX folders run on the MLX backend only")
    if quantize not in (None, 8, 4):
        raise NanochatError(f"the torch backend quantizes to 8 or 4 bits, not {quantize}")
    if gemv is not None and gemv not in GEMV_KERNELS:
        raise NanochatError(f"unknown one-row kernel {gemv!r} (choose {', '.join(GEMV_KERNELS)})")
    device = default_device()
    dtype = dtype or ("bfloat16" if quantize else default_dtype(device))
    if dtype not in TORCH_DTYPES:
        raise NanochatError(f"unknown dtype {dtype!r} (choose {', '.join(TORCH_DTYPES)})")
    if quantize == 8 and dtype == "float32":  # torch's int8 kernel is ~4x slower with float32 activations
        raise NanochatError("weight-only int8 runs with bfloat16 or float16 activations; drop --dtype float32")
    if quantize == 4 and dtype != "bfloat16":  # the int4 kernels take bfloat16 (CPU: others are 40x slower)
        raise NanochatError("weight-only int4 runs with bfloat16 activations; drop --dtype or use bfloat16")
    model = TorchGPT(ckpt, device, TORCH_DTYPES[dtype], quantize).eval()
    choose_gemv(model, gemv)
    choose_decode_attention(model)
    if quantize:
        try:  # fail at load, not mid-reply, where this torch/device has no such kernel
            with torch.inference_mode():
                model(torch.tensor([[0, 1]], device=device))
        except (RuntimeError, NotImplementedError) as e:
            raise NanochatError(
                f"no weight-only int{quantize} kernel on {device} (torch {torch.__version__}): {e}"
            ) from e
    return model
