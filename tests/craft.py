"""Build checkpoint files byte by byte, valid or hostile, without torch (for the hostile-file tests).

``.pt`` files are written as torch.save writes them (a zip of archive/data.pkl and one stored member
per storage, the pickle naming torch's rebuild functions and storage classes), by a small pickle
emitter and zip writer, so a test can set any field of a tensor record or a zip header.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import ml_dtypes
import numpy as np
from conftest import ROOT, variant_dir

from nanochat_mlx.ptfile import read_pt

STORAGE_OF = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.bool_): "BoolStorage",
}

# --- pickle opcodes --------------------------------------------------------------------------


def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(n: int) -> bytes:
    if -(1 << 31) <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def op_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_value(value: object) -> bytes:
    """Ints, floats, strings, None, bools and tuples/lists of them."""
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        return op_int(value)
    if isinstance(value, float):
        return b"G" + struct.pack(">d", value)
    if isinstance(value, str):
        return op_str(value)
    if isinstance(value, tuple):
        return op_tuple([op_value(v) for v in value])
    if isinstance(value, list):
        return b"(" + b"".join(op_value(v) for v in value) + b"l"
    raise TypeError(value)


EMPTY_ORDERED_DICT = op_global("collections", "OrderedDict") + b")R"


@dataclass
class TensorRec:
    """One ``_rebuild_tensor_v2`` record: every field can be set to anything."""

    storage: str
    storage_type: str
    numel: object
    offset: object
    size: object
    stride: object

    def ops(self) -> bytes:
        pid = op_tuple(
            [op_str("storage"), op_global("torch", self.storage_type), op_value(self.storage), op_str("cpu")]
            + [op_value(self.numel)]
        )
        args = [pid + b"Q", op_value(self.offset), op_value(self.size), op_value(self.stride), b"\x89"]
        return op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple([*args, EMPTY_ORDERED_DICT]) + b"R"


def state_pickle(tensors: dict[str, TensorRec | bytes], prefix: bytes = b"") -> bytes:
    """A protocol-2 pickle of an OrderedDict state dict (raw ``bytes`` values are emitted as they are)."""
    items = b"".join(op_str(k) + (v if isinstance(v, bytes) else v.ops()) for k, v in tensors.items())
    return b"\x80\x02" + prefix + EMPTY_ORDERED_DICT + b"(" + items + b"u."


# --- zip -------------------------------------------------------------------------------------


@dataclass
class Member:
    """A zip member; the optional fields override what its headers say."""

    name: str
    data: bytes
    method: int = 0  # 0 stored, 8 deflated (then ``data`` is the raw deflate stream)
    size: int | None = None  # uncompressed size
    stored: int | None = None  # compressed size (the member's extent in the file)
    crc: int | None = None
    header_offset: int | None = None


def zip_bytes(members: list[Member]) -> bytes:
    out, central = bytearray(), bytearray()
    for m in members:
        name = m.name.encode()
        stored = len(m.data) if m.stored is None else m.stored
        size = stored if m.size is None else m.size
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        fields = struct.pack("<HHHHHIIIHH", 20, 0, m.method, 0, 0x21, crc, stored, size, len(name), 0)
        offset = len(out) if m.header_offset is None else m.header_offset
        out += b"PK\x03\x04" + fields + name + m.data
        entry = (20, 20, 0, m.method, 0, 0x21, crc, stored, size, len(name), 0, 0, 0, 0, 0, offset)
        central += b"PK\x01\x02" + struct.pack("<HHHHHHIIIHHHHHII", *entry) + name
    n = len(members)
    return bytes(out + central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, n, n, len(central), len(out), 0))


# --- .pt files -------------------------------------------------------------------------------


@dataclass
class PtFile:
    """A torch.save zip, as records and members, to edit before writing."""

    tensors: dict[str, TensorRec | bytes]
    storages: dict[str, bytes]
    prefix: bytes = b""  # opcodes before the state dict (left on the stack; harmless when valid)
    extra: list[Member] = field(default_factory=list)

    @classmethod
    def of(cls, state: dict[str, np.ndarray]) -> PtFile:
        tensors, storages = {}, {}
        for i, (name, array) in enumerate(state.items()):
            array = np.ascontiguousarray(array)
            strides = tuple(s // array.itemsize for s in array.strides)
            tensors[name] = TensorRec(str(i), STORAGE_OF[array.dtype], array.size, 0, array.shape, strides)
            storages[str(i)] = array.tobytes()
        return cls(tensors, storages)

    def members(self) -> list[Member]:
        pkl = Member("archive/data.pkl", state_pickle(self.tensors, self.prefix))
        data = [Member(f"archive/data/{k}", v) for k, v in self.storages.items()]
        return [pkl, *data, Member("archive/version", b"3\n"), *self.extra]

    def write(self, path: Path, members: list[Member] | None = None) -> Path:
        path.write_bytes(zip_bytes(self.members() if members is None else members))
        return path

    def edit(self, name: str, **fields: object) -> PtFile:
        record = self.tensors[name]
        assert isinstance(record, TensorRec)
        self.tensors[name] = replace(record, **fields)
        return self


def fixture_state(variant: str = "g1") -> dict[str, np.ndarray]:
    return read_pt(next(variant_dir(variant).glob("model_*.pt")))


def checkpoint_dir(dest: Path, variant: str = "g1") -> Path:
    """A writable copy of a fixture (model, meta, tokenizer/) to break one file of."""
    shutil.copytree(variant_dir(variant), dest, ignore=shutil.ignore_patterns("expected"))
    return dest


def deflated_zeros(gib: int) -> bytes:
    """A raw deflate stream of ``gib`` GiB of zeros, about 1 MB per GiB (built in milliseconds)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = bytes(1 << 20)
    first = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    steady = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes for every further MiB
    return first + steady * (1024 * gib - 1) + c.flush()


# --- safetensors -----------------------------------------------------------------------------


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, data section) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict | bytes, data: bytes, header_len: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)
    return path


# --- tokenizers ------------------------------------------------------------------------------


def tokenizer_state(variant: str = "g1") -> dict:
    """The BUILD state of a fixture's pickled tiktoken Encoding."""

    class Stub:
        def __setstate__(self, state: dict) -> None:
            self.state = state

    class Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> type:
            assert (module, name) == ("tiktoken.core", "Encoding")
            return Stub

    with open(variant_dir(variant) / "tokenizer" / "tokenizer.pkl", "rb") as f:
        return Reader(f).load().state


def tokenizer_pickle(state: dict) -> bytes:
    """A tokenizer.pkl as tiktoken writes it: Encoding.__new__, then BUILD with ``state``."""
    body = pickle.dumps(state, protocol=3)[2:-1]  # protocol 3: bytes as BINBYTES, no frames
    return b"\x80\x03" + op_global("tiktoken.core", "Encoding") + b")\x81" + body + b"b."


# --- running the CLI -------------------------------------------------------------------------

CLI_MEMORY_MB = 300
CLI_SECONDS = 5.0


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # the CLI's wall time
    peak_mb: float  # the CLI's peak resident memory


# Runs argv[3:] and writes its exit code and peak memory to argv[1]. A small process of its own, so
# the peak is the CLI's: a child forked from pytest would count pytest's memory from before exec.
_MEASURE = """
import json, os, subprocess, sys, time
report, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
start = time.monotonic()
proc = subprocess.Popen(cmd)
deadline = start + timeout
while not (done := os.wait4(proc.pid, os.WNOHANG))[0]:
    if time.monotonic() > deadline:
        proc.kill()
        done = os.wait4(proc.pid, 0)
        break
    time.sleep(0.01)
_, status, usage = done
result = {"code": os.waitstatus_to_exitcode(status), "peak_kib": usage.ru_maxrss, "seconds": time.monotonic() - start}
with open(report, "w") as f:
    json.dump(result, f)
"""


def run_cli(source: Path | str, env: dict[str, str] | None = None, timeout: float = 60) -> Run:
    """``python -m nanochat_mlx.cli -p hi --source SOURCE -t 0 --max-tokens 2``, with its own rusage."""
    cmd = [sys.executable, "-m", "nanochat_mlx.cli", "-p", "hi", "--source", str(source), "-t", "0"]
    cmd += ["--max-tokens", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(report), str(timeout), *cmd],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env or _env(),
            timeout=timeout + 30,
        )
        result = json.loads(report.read_text())
    return Run(result["code"], out.stdout, out.stderr, result["seconds"], result["peak_kib"] / 1024)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def assert_clean_failure(run: Run, *names: str) -> None:
    """Non-zero exit, one error line naming ``names``, no traceback or signal, bounded time and memory."""
    assert run.returncode > 0, f"exit {run.returncode} (negative: killed by a signal)\n{run.stderr[-2000:]}"
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "panicked" not in run.stderr, run.stderr[-2000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert run.seconds < CLI_SECONDS, f"{run.seconds:.1f} s"
    assert run.peak_mb < CLI_MEMORY_MB, f"{run.peak_mb:.0f} MB"
