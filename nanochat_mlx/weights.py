"""Read tensors, map every naming scheme onto canonical names, detect the generation, validate.

Canonical names are the native nanochat state-dict names without any ``_orig_mod.`` prefix
(``transformer.h.3.attn.c_q.weight``). ``NAME_TABLE`` is the one place that knows the other
schemes (transformers' ``model.layers.*``; mlx-lm already uses the native names).
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import GENERATIONS, ArchSpec, ModelConfig
from .errors import CheckpointError
from .fileio import map_file, one_line, shown
from .ptfile import read_pt

Weights = dict[str, np.ndarray]

# (pattern, canonical template): transformers' NanoChat names -> native names.
NAME_TABLE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), t)
    for p, t in (
        (r"^model\.embed_tokens\.weight$", "transformer.wte.weight"),
        (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", r"transformer.h.\1.attn.c_q.weight"),
        (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$", r"transformer.h.\1.attn.c_k.weight"),
        (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$", r"transformer.h.\1.attn.c_v.weight"),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", r"transformer.h.\1.attn.c_proj.weight"),
        (r"^model\.layers\.(\d+)\.mlp\.fc1\.weight$", r"transformer.h.\1.mlp.c_fc.weight"),
        (r"^model\.layers\.(\d+)\.mlp\.fc2\.weight$", r"transformer.h.\1.mlp.c_proj.weight"),
    )
]
_PREFIXES = ("_orig_mod.",)

# Weight dtypes only (U32 holds the packed values of quantized converted folders).
_SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
}
_HEADER_LIMIT = 100_000_000  # the safetensors format's own cap on the JSON header
_MAX_DIMS = 8


def read_safetensors(path: str | Path) -> Weights:
    """Memory-map a safetensors file as ``{name: numpy array}`` (bfloat16 kept exact).

    The header is checked before any tensor is viewed: its length inside the file and the format's
    cap, weight dtypes, non-negative shapes, and data offsets that tile the data section in order,
    without gaps or overlaps, each as long as its shape and dtype need.
    """
    path = Path(path)
    mm = map_file(path)
    (header_len,) = struct.unpack("<Q", mm[:8].ljust(8, b"\0"))
    if len(mm) < 8 or header_len > min(_HEADER_LIMIT, len(mm) - 8):
        raise CheckpointError(f"{path}: not a safetensors file (header length {header_len}, file size {len(mm)})")
    try:
        header = json.loads(mm[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header: {one_line(str(e))})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    base, size = 8 + header_len, len(mm) - 8 - header_len
    spans = []
    for name, info in header.items():
        if name != "__metadata__":
            spans.append((*_span(info, f"{path}: tensor {shown(name)}", size), name))
    end = 0
    for start, stop, *_, name in sorted(spans, key=lambda s: s[:2]):
        if start != end:
            gap = "overlaps the tensor before it" if start < end else f"leaves bytes {end}..{start} unused"
            raise CheckpointError(f"{path}: tensor {shown(name)} at bytes {start}..{stop} {gap}")
        end = stop
    if end != size:
        raise CheckpointError(f"{path}: the tensors cover {end} of the {size} data bytes (truncated or padded)")
    return {
        name: np.frombuffer(mm, dtype=dtype, count=(stop - start) // dtype.itemsize, offset=base + start).reshape(shape)
        if stop > start
        else np.empty(shape, dtype)
        for start, stop, dtype, shape, name in spans
    }


def _span(info: object, where: str, size: int) -> tuple[int, int, np.dtype, tuple[int, ...]]:
    """(start, stop, dtype, shape) of one header entry, checked against a data section of ``size`` bytes."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: its header entry is not an object")
    name = info.get("dtype")
    dtype = _SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointError(f"{where} has dtype {shown(name)}; weights are F32, BF16, F16 (or U32 when packed)")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_count(n) for n in shape)):
        raise CheckpointError(f"{where} has a malformed shape (at most {_MAX_DIMS} non-negative ints)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(n) for n in offsets)):
        raise CheckpointError(f"{where} has malformed data_offsets (two non-negative ints)")
    start, stop = offsets
    if not start <= stop <= size:
        raise CheckpointError(f"{where} spans bytes {start}..{stop}, outside the data section of {size} bytes")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize if shape else dtype.itemsize
    if stop - start != need:
        raise CheckpointError(f"{where} holds {stop - start} bytes; shape {tuple(shape)} needs {need}")
    return start, stop, dtype, tuple(shape)


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 63


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a name appears twice")
    return out


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """The memory map ``array`` is a view of, if any (through views, strides and memoryviews)."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def release_pages(array: np.ndarray) -> None:
    """Drop the file pages a memory-mapped ``array`` has read from this process's resident memory.

    A backend copies each tensor into its own memory; without this, every page of the file it read
    would stay counted in the process (and its peak RSS) until the map is closed. Reading the array
    again simply faults the pages back in from the page cache. A no-op for in-memory arrays.
    """
    mm = _mapping(array)
    if mm is None or not hasattr(mm, "madvise") or not array.size:
        return
    start = array.ctypes.data - np.frombuffer(mm, np.uint8, count=1).ctypes.data
    first = start - start % mmap.PAGESIZE
    length = min(start + array.nbytes, len(mm)) - first
    mm.madvise(mmap.MADV_DONTNEED, first, length)


def read_tensors(paths: list[Path]) -> Weights:
    """Read every tensor of a checkpoint (one .pt, or one or more .safetensors shards)."""
    out: Weights = {}
    for path in paths:
        out.update(read_pt(path) if path.suffix == ".pt" else read_safetensors(path))
    return out


def canonical_name(name: str) -> str:
    """The native name of a tensor called ``name`` in any supported scheme."""
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    for pattern, template in NAME_TABLE:
        if pattern.match(name):
            return pattern.sub(template, name)
    return name


def canonicalize(weights: Weights, origin: str) -> Weights:
    out: Weights = {}
    for name, tensor in weights.items():
        canon = canonical_name(name)
        if canon in out:
            raise CheckpointError(f"{origin}: two tensors map to {canon}")
        out[canon] = tensor
    return out


@dataclass(frozen=True)
class Detection:
    """Which generation a checkpoint is, and why."""

    spec: ArchSpec
    reason: str
    ambiguous_with: tuple[str, ...] = ()


def detect_generation(weights: Weights, config: ModelConfig, meta: dict | None, origin: str) -> Detection:
    """Tell the generation from canonical tensor names and shapes and the meta (doc §4)."""
    names = set(weights)
    g = GENERATIONS
    branch = {"v0_lambdas", "value_embed_A.weight", "value_embed.weight"} & names
    if branch:
        raise CheckpointError(
            f"{origin}: found {sorted(branch)}: this is a value-embedding experiment from nanochat's "
            "'ve' branch that never shipped on master; it is not supported (known: g1..g9)"
        )
    engram = {"bigram_embed.embed.weight", "bigram_lambdas"} & names
    if engram:
        raise CheckpointError(
            f"{origin}: found {sorted(engram)}: this is the engram/bigram-embedding experiment "
            "(reverted upstream after a day); it is not supported (known: g1..g9)"
        )
    if "smear_gate.weight" in names:
        return Detection(g["g9"], "smear_gate.weight present (smear and backout)")
    gates = {n: w.shape for n, w in weights.items() if n.endswith(".attn.ve_gate.weight")}
    if gates:
        widths = {shape[-1] for shape in gates.values()}
        if widths == {12}:
            return Detection(g["g8"], "ve_gate.weight reads 12 channels")
        if widths == {32}:
            return Detection(
                g["g5"],
                "ve_gate.weight reads 32 channels: g5, g6 and g7 are identical on disk; "
                "defaulting to g5 (pass arch='g6' / --arch g6 or g7 to override)",
                ambiguous_with=("g6", "g7"),
            )
        raise CheckpointError(
            f"{origin}: ve_gate.weight reads {sorted(widths)} channels; known widths are 32 (g5-g7) and 12 (g8, g9)"
        )
    if "resid_lambdas" in names or "x0_lambdas" in names:
        model_config = (meta or {}).get("model_config", {})
        user_config = (meta or {}).get("user_config", {}) or {}
        if "window_pattern" in model_config:
            return Detection(g["g4"], "resid_lambdas present and meta records window_pattern")
        if "window_pattern" in user_config:
            return Detection(g["g4"], "resid_lambdas present; window_pattern only in user_config")
        return Detection(g["g3"], "resid_lambdas present, no window_pattern in meta")
    if config.padded_vocab_size > config.vocab_size:
        return Detection(g["g2"], f"wte has {config.padded_vocab_size} rows for vocab {config.vocab_size} (padded)")
    return Detection(g["g1"], "no lambdas, value embeddings or smear: the original GPT")


def expected_shapes(config: ModelConfig, spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this geometry and generation must hold, with its shape."""
    c = config
    d, kv = c.head_dim, c.n_kv_head * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (c.padded_vocab_size, c.n_embd),
        "lm_head.weight": (c.padded_vocab_size, c.n_embd),
    }
    for i in range(c.n_layer):
        h = f"transformer.h.{i}."
        shapes[h + "attn.c_q.weight"] = (c.n_head * d, c.n_embd)
        shapes[h + "attn.c_k.weight"] = (kv, c.n_embd)
        shapes[h + "attn.c_v.weight"] = (kv, c.n_embd)
        shapes[h + "attn.c_proj.weight"] = (c.n_embd, c.n_head * d)
        shapes[h + "mlp.c_fc.weight"] = (4 * c.n_embd, c.n_embd)
        shapes[h + "mlp.c_proj.weight"] = (c.n_embd, 4 * c.n_embd)
    if spec.lambdas:
        shapes["resid_lambdas"] = (c.n_layer,)
        shapes["x0_lambdas"] = (c.n_layer,)
    for i in c.ve_layers(spec):
        shapes[f"value_embeds.{i}.weight"] = (c.padded_vocab_size, kv)
        shapes[f"transformer.h.{i}.attn.ve_gate.weight"] = (c.n_kv_head, spec.ve_gate_channels)
    if spec.smear:
        shapes["smear_gate.weight"] = (1, spec.smear_channels)
        shapes["smear_lambda"] = (1,)
    if spec.backout:
        shapes["backout_lambda"] = (1,)
    return shapes


def validate(weights: Weights, config: ModelConfig, spec: ArchSpec, origin: str) -> Weights:
    """Check names and shapes against the spec; fill the lambdas the reference fills when absent."""
    weights = dict(weights)
    if spec.lambdas:  # the reference's _patch_missing_keys: identity mixing
        weights.setdefault("resid_lambdas", np.ones(config.n_layer, np.float32))
        weights.setdefault("x0_lambdas", np.zeros(config.n_layer, np.float32))
    expected = expected_shapes(config, spec)
    # Quantized layers (a converted folder) store packed weights with .scales/.biases beside them.
    quantized = {n.removesuffix(".scales") + ".weight" for n in weights if n.endswith(".scales")}
    packing = {n for q in quantized for n in (q.removesuffix("weight") + "scales", q.removesuffix("weight") + "biases")}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected) - packing)
    problems = []
    if missing:
        problems.append(f"missing tensors {_listing(missing)}")
    if extra:
        problems.append(f"unexpected tensors {_listing(extra)}")
    for name in sorted((set(expected) & set(weights)) - quantized):
        found = tuple(weights[name].shape)
        if found != expected[name]:
            problems.append(f"{name} has shape {found}, expected {expected[name]}")
    if problems:
        raise CheckpointError(f"{origin} (read as {spec.name}): " + "; ".join(problems[:4]))
    return weights


def nonfinite_error(origin: str, name: str, nan: int, inf: int, total: int) -> CheckpointError:
    """The error for a tensor holding NaN or infinite values: a diverged training run saves those."""
    found = " and ".join(f"{n:,} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
    return CheckpointError(
        f"{origin}: tensor {name} has {found} of its {total:,} values; "
        "the run that saved it diverged, or the file is corrupt"
    )


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
