"""A torch-free, safe reader for PyTorch's zip checkpoint format (``torch.save``).

The pickle inside a ``.pt`` file can name any Python global, and the stock unpickler would
import and call it. Ours only resolves the few globals a state dict needs (tensor rebuild,
storage classes, OrderedDict) and refuses everything else before anything runs. Storages are
memory-mapped from the (uncompressed) zip members, so tensors are numpy views of the file.
"""

from __future__ import annotations

import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .errors import CheckpointError

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "HalfStorage": np.dtype(np.float16),
    "DoubleStorage": np.dtype(np.float64),
    "IntStorage": np.dtype(np.int32),
    "LongStorage": np.dtype(np.int64),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stands in for ``torch.<X>Storage``: only carries the element dtype."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> np.ndarray:
    if not size:
        return storage[offset : offset + 1].reshape(())
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    expected = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    return view if tuple(stride) == expected else np.ascontiguousarray(view)


def _rebuild_parameter(data, _requires_grad, _hooks, *_unused) -> np.ndarray:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, load_storage) -> None:
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._path}: refused to load: the pickle asks for the global {module}.{name}, "
                "which a nanochat checkpoint never needs (nothing was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._path}: storage {key!r} has no known storage type")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def _member_offset(mm: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored zip member's data (after its local file header)."""
    header = mm[info.header_offset : info.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_pt(path: str | Path) -> dict[str, np.ndarray]:
    """Load a ``torch.save``d state dict as ``{name: numpy array}`` without torch.

    bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (exact, no conversion).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        zf = zipfile.ZipFile(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (zip): {e}") from None
    with zf:
        names = {info.filename: info for info in zf.infolist()}
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: no data.pkl inside; not a torch.save zip checkpoint")
        root = pkl[0][: -len("data.pkl")]

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            info = names.get(f"{root}data/{key}")
            nbytes = numel * dtype.itemsize
            if info is None or info.file_size < nbytes:
                raise CheckpointError(f"{path}: storage {key} is missing or truncated")
            if info.compress_type == zipfile.ZIP_STORED:
                start = _member_offset(mm, info)
                if start + nbytes > len(mm):
                    raise CheckpointError(f"{path}: storage {key} is truncated")
                return np.frombuffer(mm, dtype=dtype, count=numel, offset=start)
            return np.frombuffer(zf.read(info), dtype=dtype, count=numel)

        try:
            with zf.open(pkl[0]) as f:
                obj = _SafeUnpickler(f, path, load_storage).load()
        except CheckpointError:
            raise
        except Exception as e:  # corrupt pickle or zip: one line naming the file
            raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return dict(obj)
