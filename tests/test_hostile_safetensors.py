"""Hostile safetensors headers: offsets, dtypes and shapes are checked before a tensor is viewed."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from craft import assert_clean_failure, checkpoint_dir, fixture_state, run_cli, safetensors_parts, write_safetensors

from nanochat_mlx.errors import CheckpointError
from nanochat_mlx.weights import read_safetensors

Q = "transformer.h.0.attn.c_q.weight"


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("st") / "model_000500.safetensors"
    save_file({k: np.asarray(v, np.float32) for k, v in fixture_state().items()}, str(path))
    return path


def header_edit(edit: Callable[[dict], object]) -> Callable[[dict, bytes], tuple[dict | bytes, bytes, int | None]]:
    def build(header: dict, data: bytes) -> tuple[dict | bytes, bytes, int | None]:
        header = copy.deepcopy(header)
        edit(header)
        return header, data, None

    return build


def set_field(name: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda h: h[name].__setitem__(key, value)


def swap_offsets(h: dict) -> None:
    """Q's bytes claimed by Q and by the tensor after it (an overlap) — the latter moved onto Q."""
    after = min(
        (n for n in h if n != "__metadata__" and h[n]["data_offsets"][0] > h[Q]["data_offsets"][0]),
        key=lambda n: h[n]["data_offsets"][0],
    )
    h[after]["data_offsets"] = list(h[Q]["data_offsets"])
    h[after]["shape"] = list(h[Q]["shape"])


def raw(header: bytes, header_len: int | None = None) -> Callable[[dict, bytes], tuple[bytes, bytes, int | None]]:
    return lambda _h, data: (header, data, header_len)


CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    # a negative offset once pointed into the JSON header and was read as weights
    "negative offset into the header": (
        header_edit(set_field(Q, "data_offsets", [-200, -200 + 48 * 48 * 4])),
        (Q, "malformed"),
    ),
    "offset past the end": (header_edit(set_field(Q, "data_offsets", [10**9, 10**9 + 48 * 48 * 4])), (Q, "outside")),
    "end before start": (header_edit(set_field(Q, "data_offsets", [100, 50])), (Q, "outside")),
    "span shorter than the shape": (header_edit(set_field(Q, "shape", [48, 49])), (Q, "needs")),
    "overlapping tensors": (header_edit(swap_offsets), ("overlaps",)),
    "gap between tensors": (header_edit(set_field(Q, "shape", [48, 24])), (Q, "needs")),
    "int64 weights": (header_edit(set_field(Q, "dtype", "I64")), (Q, "I64")),
    "bool weights": (header_edit(set_field(Q, "dtype", "BOOL")), (Q, "BOOL")),
    "dtype not a string": (header_edit(set_field(Q, "dtype", ["F32"])), (Q, "dtype")),
    "negative dim": (header_edit(set_field(Q, "shape", [-48, -48])), (Q, "shape")),
    "bool dim": (header_edit(set_field(Q, "shape", [True, 48])), (Q, "shape")),
    "entry not an object": (header_edit(lambda h: h.__setitem__(Q, 7)), (Q, "not an object")),
    "header length beyond the file": (raw(b"{}", 1 << 40), ("header length",)),
    "header length 2**64-1": (raw(b"{}", (1 << 64) - 1), ("header length",)),
    "header not JSON": (raw(b"{not json"), ("header",)),
    "header a list": (raw(b"[1, 2]"), ("not a JSON object",)),
    "header nested 100000 deep": (raw(b"[" * 100_000), ("header",)),
    "duplicate tensor name": (raw(b'{"a": {}, "a": {}}'), ("twice",)),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_safetensors_is_refused_with_one_line(case: str, valid: Path, tmp_path: Path) -> None:
    build, names = CASES[case]
    header, data = safetensors_parts(valid)
    path = write_safetensors(tmp_path / "model_000500.safetensors", *build(header, data))
    with pytest.raises(CheckpointError) as err:
        read_safetensors(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    for name in names:
        assert name in message, (name, message)


def test_trailing_bytes_are_refused(valid: Path, tmp_path: Path) -> None:
    header, data = safetensors_parts(valid)
    path = write_safetensors(tmp_path / "m.safetensors", header, data + b"\0" * 16)
    with pytest.raises(CheckpointError, match="cover"):
        read_safetensors(path)


def test_valid_file_reads_as_written(valid: Path) -> None:
    loaded = read_safetensors(valid)
    assert all(np.array_equal(loaded[k], np.asarray(v, np.float32)) for k, v in fixture_state().items())


def test_cli_refuses_negative_offset_into_the_header(valid: Path, tmp_path: Path) -> None:
    folder = checkpoint_dir(tmp_path / "ckpt")
    (folder / "model_000500.pt").unlink()
    header, data = safetensors_parts(valid)
    header[Q]["data_offsets"] = [-200, -200 + 48 * 48 * 4]
    write_safetensors(folder / "model_000500.safetensors", header, data)
    assert_clean_failure(run_cli(folder), "model_000500.safetensors", Q)
