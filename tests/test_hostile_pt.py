"""Hostile .pt files: every tensor record and zip member is checked before a byte is viewed.

Each case breaks one thing of a valid g1 checkpoint built by tests/craft.py; the reader must refuse
it with one line naming the file (and the tensor), whatever the old reader did (a crash, a read
outside the storage, an allocation of gigabytes, a pickle payload run).
"""

from __future__ import annotations

import resource
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from craft import (
    Member,
    PtFile,
    assert_clean_failure,
    checkpoint_dir,
    deflated_zeros,
    fixture_state,
    op_global,
    op_str,
    op_tuple,
    run_cli,
)

from nanochat_mlx.errors import CheckpointError
from nanochat_mlx.ptfile import read_pt

WTE = "transformer.wte.weight"  # (400, 48) in g1
Q = "transformer.h.0.attn.c_q.weight"  # (48, 48)


def crafted(edit: Callable[[PtFile], object]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        pt = PtFile.of(fixture_state())
        members = edit(pt)
        return pt.write(path, members if isinstance(members, list) else None)

    return build


def members_with(pt: PtFile, name: str, **fields: object) -> list[Member]:
    members = pt.members()
    for i, m in enumerate(members):
        if m.name == name:
            members[i] = Member(**{**m.__dict__, **fields})
    return members


def other_member(pt: PtFile) -> list[Member]:
    """The central directory entry of data/1 pointing at data/0's local header."""
    members = pt.members()
    offset = 30 + len(members[0].name.encode()) + len(members[0].data)
    return members_with(pt, "archive/data/1", header_offset=offset)


PAYLOAD_MARKER = "hostile-payload-ran"
STATE = op_str("dtype") + op_str("x")  # {'dtype': 'x'} once broke every later load
SLOT_STATE = b"N}" + op_str("__defaults__") + b"Ns\x86"  # (None, {'__defaults__': None}): setattr


def os_system(pt: PtFile) -> None:
    pt.prefix = op_global("os", "system") + op_tuple([op_str(f"touch {PAYLOAD_MARKER}")]) + b"R0"


CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    # stride (10**9, 1) once ran past the mapping (SIGSEGV)
    "huge stride": (crafted(lambda pt: pt.edit(WTE, stride=(10**9, 1))), (WTE, "strides")),
    "negative stride": (crafted(lambda pt: pt.edit(WTE, stride=(-48, 1))), (WTE, "malformed")),
    "transposed strides": (crafted(lambda pt: pt.edit(Q, stride=(1, 48))), (Q, "strides")),
    "zero strides": (crafted(lambda pt: pt.edit(Q, stride=(0, 0))), (Q, "strides")),
    "offset past the storage": (crafted(lambda pt: pt.edit(WTE, offset=400 * 48)), (WTE, "reads elements")),
    "negative offset": (crafted(lambda pt: pt.edit(WTE, offset=-48)), (WTE, "malformed")),
    "shape larger than the storage": (
        crafted(lambda pt: pt.edit(WTE, size=(401, 48))),
        (WTE, "reads elements"),
    ),
    # a 1.5 GiB tensor declared over one element: refused before anything is allocated
    "1.5 GiB over one element": (
        crafted(lambda pt: pt.edit(Q, size=(1 << 14, 1 << 13, 3), stride=(3 << 13, 3, 1), numel=1)),
        (Q, "declares 1"),
    ),
    "storage larger than its member": (crafted(lambda pt: pt.edit(Q, numel=10**12)), (Q, "declares")),
    "negative dim": (crafted(lambda pt: pt.edit(Q, size=(-48, 48))), (Q, "malformed")),
    "size as a list": (crafted(lambda pt: pt.edit(Q, size=[48, 48])), (Q, "malformed")),
    "bool dim": (crafted(lambda pt: pt.edit(Q, size=(True, 48), stride=(48, 1))), (Q, "malformed")),
    "nine dims": (crafted(lambda pt: pt.edit(Q, size=(1,) * 9, stride=(1,) * 9)), (Q, "malformed")),
    "int64 weights": (crafted(lambda pt: pt.edit(Q, storage_type="LongStorage", numel=48 * 48 // 2)), (Q, "Long")),
    "bool weights": (crafted(lambda pt: pt.edit(Q, storage_type="BoolStorage")), (Q, "BoolStorage")),
    "missing storage": (crafted(lambda pt: pt.edit(Q, storage="99")), (Q, "missing")),
    "storage key not a string": (crafted(lambda pt: pt.edit(Q, storage=7)), (Q, "malformed storage")),
    "value not a tensor": (crafted(lambda pt: pt.tensors.update({Q: b"J\x07\x00\x00\x00"})), (Q, "not a tensor")),
    "key not a string": (
        crafted(lambda pt: pt.tensors.update({Q: b"0" + b"J\x07\x00\x00\x00" + pt.tensors[Q].ops()})),
        ("key",),
    ),
    "compressed storage": (crafted(lambda pt: members_with(pt, "archive/data/0", method=8)), ("compressed",)),
    "central directory points at another member": (crafted(other_member), ("another member",)),
    "member sizes disagree": (crafted(lambda pt: members_with(pt, "archive/data/3", size=10**8)), ("inconsistent",)),
    "members overlap": (crafted(lambda pt: members_with(pt, "archive/data/0", stored=48 * 400 * 4 + 40)), ("overlap",)),
    "member past the end": (crafted(lambda pt: members_with(pt, "archive/version", stored=10**8)), ("past the end",)),
    "duplicate member": (crafted(lambda pt: [*pt.members(), pt.members()[1]]), ("twice",)),
    "os.system in the pickle": (crafted(os_system), ("os.system", "nothing was executed")),
    "BUILD on a storage class": (
        crafted(lambda pt: setattr(pt, "prefix", op_global("torch", "FloatStorage") + b"}" + STATE + b"s" + b"b0")),
        ("BUILD",),
    ),
    "BUILD on the rebuild function": (
        crafted(lambda pt: setattr(pt, "prefix", op_global("torch._utils", "_rebuild_tensor_v2") + SLOT_STATE + b"b0")),
        ("BUILD",),
    ),
    "pickle too large": (crafted(lambda pt: setattr(pt, "prefix", op_str("x" * (9 << 20)) + b"0")), ("data.pkl",)),
    "empty file": (lambda path: (path.write_bytes(b""), path)[1], ("empty",)),
    "not a zip": (lambda path: (path.write_bytes(b"\x80\x02}q\x00."), path)[1], ("zip",)),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_pt_is_refused_with_one_line(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    build, names = CASES[case]
    path = build(tmp_path / "model_000500.pt")
    with pytest.raises(CheckpointError) as err:
        read_pt(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    for name in names:
        assert name in message, (name, message)
    assert not (tmp_path / PAYLOAD_MARKER).exists()


def test_poisoning_build_leaves_later_loads_intact(tmp_path: Path) -> None:
    """A refused BUILD on an allow-listed global must not change it for the next load."""
    hostile = CASES["BUILD on a storage class"][0](tmp_path / "hostile.pt")
    with pytest.raises(CheckpointError):
        read_pt(hostile)
    valid = PtFile.of(fixture_state()).write(tmp_path / "valid.pt")
    loaded = read_pt(valid)
    assert all(np.array_equal(loaded[k], v) for k, v in fixture_state().items())


def test_huge_memo_index_is_bounded(tmp_path: Path) -> None:
    """LONG_BINPUT 2**28: the C unpickler would allocate a 2 GiB memo array; ours keeps a dict."""
    pt = PtFile.of(fixture_state())
    pt.prefix = b"N" + b"r" + struct.pack("<I", 1 << 28) + b"0"
    path = pt.write(tmp_path / "model.pt")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert set(read_pt(path)) == set(fixture_state())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB


def test_tensors_are_read_only_views_of_the_file(tmp_path: Path) -> None:
    path = PtFile.of(fixture_state()).write(tmp_path / "model.pt")
    loaded = read_pt(path)
    assert all(not v.flags.owndata and not v.flags.writeable for v in loaded.values())


# --- the CLI, as a subprocess: a few representative files ----------------------------------


def hostile_folder(tmp_path: Path, build: Callable[[Path], Path]) -> Path:
    folder = checkpoint_dir(tmp_path / "ckpt")
    build(folder / "model_000500.pt")
    return folder


def test_cli_refuses_huge_stride(tmp_path: Path) -> None:
    folder = hostile_folder(tmp_path, CASES["huge stride"][0])
    assert_clean_failure(run_cli(folder), "model_000500.pt", WTE)


def test_cli_refuses_a_gigabyte_deflate_bomb(tmp_path: Path) -> None:
    """1 GiB of zeros deflated into a 1 MB member: refused without inflating anything."""

    def bomb(pt: PtFile) -> list[Member]:
        return members_with(pt, "archive/data/0", method=8, data=deflated_zeros(1), size=1 << 30, crc=0)

    folder = hostile_folder(tmp_path, crafted(bomb))
    assert_clean_failure(run_cli(folder), "model_000500.pt", "compressed")


def test_cli_refuses_a_tensor_declared_over_one_element(tmp_path: Path) -> None:
    folder = hostile_folder(tmp_path, CASES["1.5 GiB over one element"][0])
    assert_clean_failure(run_cli(folder), "model_000500.pt", Q)
