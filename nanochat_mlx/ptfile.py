"""A torch-free, checked reader for PyTorch's zip checkpoint format (``torch.save``).

Nothing in a ``.pt`` file is trusted, and every check runs before a byte of a tensor is viewed:

- the zip: members stored (torch never compresses them), inside the file, not overlapping, each
  local header naming its member as the central directory does;
- the pickle: run by the pure-Python unpickler (its memo is a dict; the C one allocates an array
  as long as the largest memo index a file names), with only the globals a state dict needs. Those
  are fresh objects for each load and refuse BUILD, so no pickle can alter them for later loads;
- every tensor record: a weight dtype, at most 8 non-negative dims, exactly the contiguous strides
  torch writes, offset + extent inside its storage, and the storage exactly as large as its member.

Tensors are then numpy views of the memory-mapped file: memory is bounded by the file itself.
"""

from __future__ import annotations

import io
import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from .errors import CheckpointError
from .fileio import MiB, map_file, one_line, shown

# Storage classes by name; None marks dtypes a checkpoint may name but weights never have.
_STORAGE_DTYPES: dict[str, np.dtype | None] = {
    "FloatStorage": np.dtype(np.float32),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "HalfStorage": np.dtype(np.float16),
    "DoubleStorage": None,
    "IntStorage": None,
    "LongStorage": None,
    "ShortStorage": None,
    "CharStorage": None,
    "ByteStorage": None,
    "BoolStorage": None,
}
_WEIGHT_DTYPES = "float32, bfloat16 or float16"
_MAX_DIMS = 8
_PICKLE_LIMIT = 8 * MiB  # a state dict's pickle is ~150 bytes per tensor


class _Bad(Exception):
    """A problem found while unpickling; ``read_pt`` adds the file name."""


class _Global:
    """An allow-listed global for one load: callable as the original, refuses BUILD."""

    __slots__ = ("name", "_call")

    def __init__(self, name: str, call: Callable[..., Any] | None) -> None:
        self.name = name
        self._call = call

    def __call__(self, *args: Any) -> Any:
        if self._call is None:
            raise _Bad(f"the pickle calls {self.name}, which is a storage type")
        return self._call(*args)

    def __setstate__(self, state: Any) -> None:
        raise _Bad(f"the pickle tries to set state on {self.name} (BUILD); refused")


class _StorageRef(NamedTuple):
    type_name: str
    dtype: np.dtype | None
    key: Any
    numel: Any


class _TensorRef(NamedTuple):
    storage: Any
    offset: Any
    size: Any
    stride: Any


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_unused: Any) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)  # checked with its name after unpickling


def _rebuild_parameter(data: Any, *_unused: Any) -> Any:
    return data


class _SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler, for its dict memo
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._globals = {
            ("torch._utils", "_rebuild_tensor_v2"): _Global("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
            ("torch._utils", "_rebuild_parameter"): _Global("torch._utils._rebuild_parameter", _rebuild_parameter),
            ("collections", "OrderedDict"): _Global("collections.OrderedDict", OrderedDict),
            **{("torch", name): _Global(f"torch.{name}", None) for name in _STORAGE_DTYPES},
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._globals[(module, name)]
        except (KeyError, TypeError):
            raise _Bad(
                f"refused to load: the pickle asks for the global {shown(module)}.{shown(name)}, "
                "which a nanochat checkpoint never needs (nothing was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise _Bad("unexpected persistent id in the pickle (not a torch storage)")
        _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, _Global) and storage_type.name.endswith("Storage")):
            raise _Bad("a storage in the pickle has no known storage type")
        name = storage_type.name.removeprefix("torch.")
        return _StorageRef(name, _STORAGE_DTYPES[name], key, numel)


class _Zip:
    """The members of a checked torch zip: name -> (data offset, size) in the mapped file."""

    def __init__(self, mm: mmap.mmap, path: Path) -> None:
        try:
            with zipfile.ZipFile(mm) as zf:  # parses the central directory only; nothing is extracted
                infos = zf.infolist()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint (zip): {one_line(str(e))}") from None
        self.members: dict[str, tuple[int, int]] = {}
        regions = []
        for info in infos:
            name = info.filename
            where = f"{path}: zip member {shown(name)}"
            if name in self.members:
                raise CheckpointError(f"{where} appears twice in the central directory")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise CheckpointError(f"{where} is compressed or encrypted; torch.save stores members as they are")
            if info.compress_size != info.file_size:
                raise CheckpointError(f"{where} has inconsistent sizes in the central directory")
            start = info.header_offset
            header = mm[start : start + 30]
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{where}: no local header where the central directory points")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            encoded = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
            if mm[start + 30 : start + 30 + name_len] != encoded:
                raise CheckpointError(f"{where}: its local header names another member")
            data = start + 30 + name_len + extra_len
            if data + info.file_size > len(mm):
                raise CheckpointError(f"{where} runs past the end of the file")
            self.members[name] = (data, info.file_size)
            regions.append((start, data + info.file_size, name))
        regions.sort()
        for (_, end, first), (start, _, second) in zip(regions, regions[1:], strict=False):
            if start < end:
                raise CheckpointError(f"{path}: zip members {shown(first)} and {shown(second)} overlap")


def read_pt(path: str | Path) -> dict[str, np.ndarray]:
    """Load a ``torch.save``d state dict as ``{name: numpy array}`` without torch.

    bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (exact, no conversion).
    """
    path = Path(path)
    mm = map_file(path)
    members = _Zip(mm, path).members
    pkl = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointError(f"{path}: no data.pkl inside; not a torch.save zip checkpoint")
    root = pkl[0].removesuffix("data.pkl")
    start, size = members[pkl[0]]
    if size > _PICKLE_LIMIT:
        raise CheckpointError(f"{path}: data.pkl is {size} bytes, more than a state dict's pickle ever holds")
    try:
        obj = _SafeUnpickler(mm[start : start + size]).load()
    except _Bad as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # a corrupt pickle: one line naming the file
        raise CheckpointError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {one_line(str(e))})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    storages: dict[tuple[str, str], np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for name, ref in obj.items():
        if type(name) is not str:
            raise CheckpointError(f"{path}: a state dict key is a {type(name).__name__}, not a tensor name")
        out[name] = _tensor(ref, f"{path}: tensor {shown(name)}", mm, members, root, storages)
    return out


def _tensor(
    ref: Any,
    where: str,
    mm: mmap.mmap,
    members: dict[str, tuple[int, int]],
    root: str,
    storages: dict[tuple[str, str], np.ndarray],
) -> np.ndarray:
    """The checked view of one tensor record (``where`` names the file and tensor for errors)."""
    if not isinstance(ref, _TensorRef) or not isinstance(ref.storage, _StorageRef):
        raise CheckpointError(f"{where} is not a tensor record")
    st = ref.storage
    if st.dtype is None:
        raise CheckpointError(f"{where} is stored as torch.{st.type_name}; weights are {_WEIGHT_DTYPES}")
    size, stride, offset = ref.size, ref.stride, ref.offset
    if not (_ints(size) and _ints(stride) and len(size) == len(stride) <= _MAX_DIMS and _ints((offset,))):
        raise CheckpointError(f"{where} has a malformed record (size, stride and offset must be non-negative ints)")
    contiguous, step = [], 1
    for n in reversed(size):
        contiguous.insert(0, step)
        step *= max(n, 1)
    if list(stride) != contiguous:
        raise CheckpointError(f"{where} has strides {tuple(stride)}; torch writes {tuple(contiguous)} for {size}")
    if type(st.key) is not str or not _ints((st.numel,)):
        raise CheckpointError(f"{where} names a malformed storage")
    member = members.get(f"{root}data/{st.key}")
    if member is None:
        raise CheckpointError(f"{where}: its storage {shown(st.key)} is missing from the zip")
    start, nbytes = member
    if st.numel * st.dtype.itemsize != nbytes:
        raise CheckpointError(
            f"{where}: storage {shown(st.key)} declares {st.numel} {st.dtype} elements "
            f"({st.numel * st.dtype.itemsize} bytes) but its member holds {nbytes} bytes"
        )
    numel = int(np.prod(size, dtype=object)) if size else 1
    if offset + numel > st.numel:
        raise CheckpointError(
            f"{where} reads elements {offset}..{offset + numel} of a storage of {st.numel} (shape {tuple(size)})"
        )
    cache_key = (st.key, st.dtype.str)
    if cache_key not in storages:
        storages[cache_key] = (
            np.frombuffer(mm, dtype=st.dtype, count=st.numel, offset=start) if st.numel else np.empty(0, st.dtype)
        )
    return storages[cache_key][offset : offset + numel].reshape(tuple(size))


def _ints(values: Any) -> bool:
    """A tuple of plain ints in [0, 2**63) (no bools, no subclasses), as torch's int64 fields."""
    return type(values) is tuple and all(type(v) is int and 0 <= v < 1 << 63 for v in values)
