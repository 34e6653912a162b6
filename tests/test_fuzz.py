"""A bounded, seeded fuzz of the readers: bytes and fields of a valid .pt, safetensors and meta file
are mutated; every case must load or raise a NanochatError with a one-line message that names the
file, never another exception, a crash, a hang or unbounded memory."""

from __future__ import annotations

import json
import random
import resource
import signal
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
from craft import PtFile, TensorRec, checkpoint_dir, fixture_state, safetensors_parts, write_safetensors

from nanochat_mlx.checkpoint import read_checkpoint
from nanochat_mlx.errors import NanochatError
from nanochat_mlx.ptfile import read_pt
from nanochat_mlx.weights import read_safetensors

SEED = 20261201
CASE_SECONDS = 5
MEMORY_GROWTH_MB = 300

INTERESTING: list[object] = [-1, 0, 1, 2, 7, 48, 400, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 10**9, 10**30, True, None]
INTERESTING += ["48", 1.5, [], [1], (), (1, 2, 3)]


def flip_bytes(rng: random.Random, data: bytes, hot: list[tuple[int, int]], alphabet: bytes = b"") -> bytes:
    """A few bytes set at random, mostly inside the structural ``hot`` ranges (headers, pickle),
    often from ``alphabet`` (JSON's characters, for a header that should still parse)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        start, stop = rng.choice(hot) if rng.random() < 0.8 else (0, len(out))
        byte = rng.choice(alphabet) if alphabet and rng.random() < 0.7 else rng.randrange(256)
        out[rng.randrange(start, max(start + 1, stop))] = byte
    if rng.random() < 0.1:
        del out[rng.randrange(len(out)) :]
    return bytes(out)


def pt_hot_ranges(data: bytes) -> list[tuple[int, int]]:
    """The pickle and every zip header of a .pt (the bytes that steer the reader)."""
    import zipfile
    from io import BytesIO

    zf = zipfile.ZipFile(BytesIO(data))
    ranges = [(i.header_offset, i.header_offset + 60) for i in zf.infolist()]
    pkl = zf.getinfo("archive/data.pkl")
    ranges.append((pkl.header_offset, pkl.header_offset + 30 + len(pkl.filename) + pkl.file_size))
    ranges.append((zf.start_dir, len(data)))
    return ranges


def pt_cases(rng: random.Random, tmp: Path, n: int) -> Iterator[tuple[str, Path, Callable]]:
    valid = PtFile.of(fixture_state()).write(tmp / "valid.pt").read_bytes()
    hot = pt_hot_ranges(valid)
    for i in range(n):
        path = tmp / f"model_{i}.pt"
        if i % 2:
            path.write_bytes(flip_bytes(rng, valid, hot))
        else:
            pt = PtFile.of(fixture_state())
            name = rng.choice(list(pt.tensors))
            record = pt.tensors[name]
            assert isinstance(record, TensorRec)
            fields = rng.sample(["offset", "size", "stride", "numel", "storage", "storage_type"], rng.randint(1, 3))
            for f in fields:
                value: object = rng.choice(INTERESTING)
                if f == "storage_type":
                    value = rng.choice(["FloatStorage", "HalfStorage", "LongStorage", "BoolStorage", "ByteStorage"])
                elif f in ("size", "stride") and rng.random() < 0.5:
                    value = tuple(rng.choice(INTERESTING[:12]) for _ in range(rng.randint(0, 3)))
                pt.edit(name, **{f: value})
            pt.write(path)
        yield f"pt {i}", path, read_pt


def safetensors_cases(rng: random.Random, tmp: Path, n: int) -> Iterator[tuple[str, Path, Callable]]:
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, np.float32) for k, v in fixture_state().items()}, str(tmp / "valid.safetensors"))
    valid = (tmp / "valid.safetensors").read_bytes()
    header, data = safetensors_parts(tmp / "valid.safetensors")
    header_end = 8 + int.from_bytes(valid[:8], "little")
    for i in range(n):
        path = tmp / f"model_{i}.safetensors"
        if i % 2:
            path.write_bytes(flip_bytes(rng, valid, [(0, header_end)], b'0123456789-,:[]{}" '))
        else:
            edited = json.loads(json.dumps(header))
            name = rng.choice([k for k in edited if k != "__metadata__"])
            key = rng.choice(["dtype", "shape", "data_offsets"])
            value = rng.choice(INTERESTING)
            if key == "data_offsets" and rng.random() < 0.7:
                start = rng.choice([-200, -1, 0, 8, 4096, len(data), len(data) + 1])
                value = [start, start + rng.choice([0, 4, 9216, 76800])]
            elif key == "dtype" and rng.random() < 0.5:
                value = rng.choice(["F32", "F16", "BF16", "I64", "BOOL", "U32", "F64"])
            edited[name][key] = list(value) if isinstance(value, tuple) else value
            write_safetensors(path, edited, data)
        yield f"safetensors {i}", path, read_safetensors


def meta_cases(rng: random.Random, tmp: Path, n: int) -> Iterator[tuple[str, Path, Callable]]:
    folder = checkpoint_dir(tmp / "ckpt")
    meta_path = folder / "meta_000500.json"
    valid = meta_path.read_text()
    for i in range(n):
        meta = json.loads(valid)
        if i % 3 == 2:
            text = bytearray(valid.encode())
            for _ in range(rng.randint(1, 4)):
                text[rng.randrange(len(text))] = rng.randrange(32, 127)
            meta_path.write_bytes(bytes(text))
        else:
            for _ in range(rng.randint(1, 3)):
                key = rng.choice([*meta["model_config"], "window_pattern"])
                if rng.random() < 0.15:
                    meta["model_config"].pop(key, None)
                else:
                    meta["model_config"][key] = rng.choice([*INTERESTING, "SSL", "X", 10**6, 4, 5, 64])
            meta_path.write_text(json.dumps(meta))
        yield f"meta {i}", meta_path, lambda _path: read_checkpoint(str(folder))


class _Hang(Exception):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise _Hang


@pytest.fixture
def watchdog() -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _alarm)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fuzzed_files_load_or_fail_with_one_line(tmp_path: Path, watchdog: None) -> None:
    rng = random.Random(SEED)
    # generators, consumed one case at a time: the meta cases rewrite one file in place
    cases = chain(pt_cases(rng, tmp_path, 160), safetensors_cases(rng, tmp_path, 100), meta_cases(rng, tmp_path, 80))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"loaded": 0, "refused": 0}
    for label, path, read in cases:
        signal.alarm(CASE_SECONDS)
        try:
            read(path)
            outcomes["loaded"] += 1
        except NanochatError as e:
            message = str(e)
            assert "\n" not in message and str(path.parent) in message, (label, message)
            outcomes["refused"] += 1
        except _Hang:
            pytest.fail(f"{label}: still running after {CASE_SECONDS} s")
        finally:
            signal.alarm(0)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < MEMORY_GROWTH_MB, f"peak memory grew by {grown_mb:.0f} MB"
    assert outcomes["loaded"] and outcomes["refused"] > outcomes["loaded"] / 4, outcomes
