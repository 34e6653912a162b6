"""Open user-given files safely: regular files only, sizes capped before anything is read.

A file named like a checkpoint may be a FIFO (an open or read would block forever), a link to
/dev/zero (a read would never end) or far larger than its kind ever is. Every reader of
checkpoint, meta, config and tokenizer files opens through here, so those are refused up front
with one line naming the file.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointError

MiB = 1 << 20
JSON_LIMIT = 16 * MiB  # meta_<step>.json and config.json are a few KiB


def open_regular(path: Path) -> tuple[BinaryIO, int]:
    """An open binary file and its size; anything but a regular file is refused without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    mode, size = (st := os.fstat(fd)).st_mode, st.st_size
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file ({_kind(mode)})")
    return os.fdopen(fd, "rb"), size


def read_bytes(path: Path, limit: int, what: str) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes."""
    f, size = open_regular(path)
    with f:
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise CheckpointError(f"{path}: {max(size, len(data))} bytes, more than a {what} ever holds ({limit})")
    return data


def read_json(path: Path, what: str, limit: int = JSON_LIMIT) -> Any:
    """A JSON document from a regular file of at most ``limit`` bytes."""
    try:
        return json.loads(read_bytes(path, limit, what).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({one_line(str(e))})") from None


def map_file(path: Path) -> mmap.mmap:
    """A read-only memory map of a non-empty regular file."""
    f, size = open_regular(path)
    with f:
        if size == 0:
            raise CheckpointError(f"{path}: empty file")
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot map ({e})") from None


def shown(text: object, limit: int = 80) -> str:
    """A name from a file as it can appear in a one-line message (short, printable)."""
    text = str(text)
    if text.isprintable() and len(text) <= limit:
        return text
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


def as_json(value: object) -> str:
    """A value from a file spelled as JSON spells it: a string "64" is not the number 64."""
    return json.dumps(value, default=str)


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"
