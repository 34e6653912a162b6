"""Write a checkpoint folder as the reference's ``save_checkpoint`` does, without torch.

``model_<step:06d>.pt`` is laid out as ``torch.save`` writes a state dict: an uncompressed zip
under one top folder (the file's stem) holding ``data.pkl`` (protocol-2 pickle whose tensors are
``torch._utils._rebuild_tensor_v2`` calls on persistent storage ids), one ``data/<n>`` member
per storage (64-byte aligned), ``byteorder``, ``version`` and ``.data/serialization_id``. So
``torch.load(weights_only=True)``, the reference's ``build_model`` and ``nanochat_mlx.ptfile`` read it.
Beside it: ``meta_<step:06d>.json`` and ``tokenizer/`` (``tokenizer.pkl``, ``token_bytes.pt``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import NanochatError

ALIGNMENT = 64  # torch aligns every storage to 64 bytes in the file (so it can be memory-mapped)
_STORAGES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int64): "LongStorage",
}


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _string(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value) if value < 2**31 else pickle.LONG1 + _long(value)


def _long(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return bytes([len(data)]) + data


def _tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _tensor(key: int, shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """Pickle ops rebuilding a tensor of ``shape`` and ``dtype`` from storage ``key``, as torch pickles one."""
    storage = _STORAGES.get(np.dtype(dtype))
    if storage is None:
        raise NanochatError(f"cannot save a {dtype} tensor: no torch storage type for it")
    strides = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    size = int(np.prod(shape))
    pid = _tuple([_string("storage"), _global("torch", storage), _string(str(key)), _string("cpu"), _int(size)])
    args = [
        pid + pickle.BINPERSID,
        _int(0),  # storage offset
        _tuple([_int(n) for n in shape]),
        _tuple([_int(s) for s in strides]),
        pickle.NEWFALSE,  # requires_grad
        _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE,  # backward hooks
    ]
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + pickle.REDUCE


def _member(zf: zipfile.ZipFile, name: str, data: bytes | memoryview) -> None:
    """A stored member whose data starts on an ALIGNMENT boundary (padding in the extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header = zf.fp.tell() + 30 + len(name.encode())
    pad = -(header + 4) % ALIGNMENT  # a 4-byte extra record header, then padding
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB", the record id torch uses
    info.file_size = len(data)
    with zf.open(info, "w", force_zip64=len(data) >= 2**31) as f:
        f.write(data)


def _archive(path: Path, pkl: bytes, arrays: Iterable[np.ndarray]) -> None:
    """The zip, written beside ``path`` and renamed into place (no half-written checkpoint)."""
    root, partial = path.stem, path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as zf:
        _member(zf, f"{root}/data.pkl", pkl)
        _member(zf, f"{root}/.format_version", b"1")
        _member(zf, f"{root}/.storage_alignment", str(ALIGNMENT).encode())
        _member(zf, f"{root}/byteorder", b"little")
        for key, array in enumerate(arrays):
            _member(
                zf, f"{root}/data/{key}", memoryview(np.require(array, requirements="C").reshape(-1).view(np.uint8))
            )
        _member(zf, f"{root}/version", b"3\n")
        # torch writes a random 40-digit id; a digest of the content keeps our files reproducible.
        digest = int.from_bytes(hashlib.sha256(pkl).digest()[:16], "little") % 10**40
        _member(zf, f"{root}/.data/serialization_id", f"{digest:040d}".encode())
    os.replace(partial, path)


def write_pt(path: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``{name: numpy array}`` as ``torch.save(state_dict)`` would (float32/bf16/fp16/int32/int64)."""
    arrays = {name: np.asarray(array) for name, array in tensors.items()}  # keeps 0-d arrays 0-d
    write_pt_lazily(path, {name: (a.shape, a.dtype) for name, a in arrays.items()}, arrays.__getitem__)


def write_pt_lazily(
    path: str | Path, layout: dict[str, tuple[tuple[int, ...], np.dtype]], array: Callable[[str], np.ndarray]
) -> None:
    """``write_pt`` of tensors of these names, shapes and dtypes, each made by ``array(name)`` when it
    is written (so a model's weights are copied one at a time, never all at once)."""
    items = [
        _string(name) + _tensor(key, tuple(shape), dtype) for key, (name, (shape, dtype)) in enumerate(layout.items())
    ]
    pkl = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + b"".join(items) + pickle.SETITEMS + pickle.STOP
    _archive(Path(path), pkl, (_checked(array(name), *layout[name]) for name in layout))


def _checked(array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
        raise NanochatError(f"tensor of {array.shape} {array.dtype} where {shape} {dtype} was announced")
    return array


def write_pt_tensor(path: str | Path, array: np.ndarray) -> None:
    """Write one tensor as ``torch.save(tensor)`` would (``token_bytes.pt`` holds one)."""
    array = np.require(array, requirements="C")
    _archive(Path(path), pickle.PROTO + b"\x02" + _tensor(0, array.shape, array.dtype) + pickle.STOP, [array])


def meta_model_config(model: Any) -> dict[str, Any]:
    """The GPTConfig fields of the model's generation (window_pattern exists from g4 on)."""
    c = model.config
    config: dict[str, Any] = {
        "sequence_len": c.sequence_len,
        "vocab_size": c.vocab_size,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_kv_head": c.n_kv_head,
        "n_embd": c.n_embd,
    }
    if model.spec.windowed:
        config["window_pattern"] = c.window_pattern
    return config


def token_bytes(tokenizer: Any) -> np.ndarray:
    """Bytes per token id, special tokens 0 (as the reference's tok_train.py computes it at HEAD)."""
    specials = set(tokenizer.enc._special_tokens.values())
    return np.array(
        [0 if i in specials else len(tokenizer.enc.decode_single_token_bytes(i)) for i in range(tokenizer.vocab_size)],
        dtype=np.int32,
    )


def write_tokenizer(directory: Path, tokenizer: Any) -> None:
    """``tokenizer.pkl`` (a pickled tiktoken Encoding) and ``token_bytes.pt``: the source's own
    files when it is a nanochat tokenizer folder, else written from the loaded tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    source = Path(tokenizer.source) if tokenizer.source else None
    if source is not None and source.name == "tokenizer.pkl" and (source.parent / "token_bytes.pt").is_file():
        for name in ("tokenizer.pkl", "token_bytes.pt"):
            if not (directory / name).exists() or not (directory / name).samefile(source.parent / name):
                shutil.copyfile(source.parent / name, directory / name)
        return
    (directory / "tokenizer.pkl").write_bytes(pickle.dumps(tokenizer.enc))
    write_pt_tensor(directory / "token_bytes.pt", token_bytes(tokenizer))


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: Any,
    tokenizer: Any,
    val_bpb: float | None = None,
    user_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights (canonical names, float32) as a reference checkpoint folder:
    ``model_<step:06d>.pt``, ``meta_<step:06d>.json`` and ``tokenizer/``. Returns the folder."""
    from . import _backend

    backend = _backend(model)
    params = backend.parameters(model)
    directory = Path(directory)
    meta = {
        "step": step,
        "val_bpb": val_bpb,
        "model_config": meta_model_config(model),
        "user_config": user_config or {},
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        layout = {name: (tuple(p.shape), np.dtype(np.float32)) for name, p in params.items()}
        write_pt_lazily(directory / f"model_{step:06d}.pt", layout, lambda name: backend.to_numpy(params[name]))
        (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        write_tokenizer(directory / "tokenizer", tokenizer)
    except OSError as e:
        raise NanochatError(f"{directory}: cannot write the checkpoint ({e})") from None
    return directory
