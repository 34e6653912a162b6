"""The CLI's standard streams, whatever state the shell left them in.

A stream closed at startup (``>&-``, ``<&-``, ``2>&-``) is ``None`` in ``sys``, and a write to a full
or broken one raises a bare OSError; both would surface as cryptic errors. :func:`install` puts
wrappers in their place: stdout's failures become one :class:`StdoutError` line, a closed stdin
says so when read, and stderr never stops a run (with it closed or full, notes go nowhere).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from .errors import NanochatError


class StdoutError(NanochatError):
    """stdout can't take the output (closed, disk full, ...): the reply has nowhere to go."""


class _Stdout:
    """sys.stdout whose write failures name stdout (a reader that left is still BrokenPipeError)."""

    def __init__(self, stream: TextIO | None) -> None:
        self.closed_at_start = stream is None
        self._stream = stream if stream is not None else open(os.devnull, "w")

    def write(self, text: str) -> int:
        if self.closed_at_start:
            raise StdoutError("can't write to stdout: it is closed")
        return _stdout_call(self._stream.write, text)

    def flush(self) -> None:
        _stdout_call(self._stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stdout_call(method: Callable[..., Any], *args: Any) -> Any:
    try:
        return method(*args)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise StdoutError(f"can't write to stdout: {e.strerror or e}") from None


class _Stderr:
    """sys.stderr that never fails: a note that can't be written is dropped, not a new error."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream if stream is not None else open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _ClosedStdin(io.TextIOBase):
    """sys.stdin when it was closed at startup: reading it is a one-line error."""

    closed_at_start = True

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        raise NanochatError("stdin is closed")

    def readline(self, size: int | None = -1) -> str:
        raise NanochatError("stdin is closed")


def install() -> None:
    """Wrap the three standard streams (once). A descriptor closed at startup gets /dev/null, so a
    file opened later can't take its number and receive output meant for the terminal."""
    for fd, stream in ((0, sys.stdin), (1, sys.stdout), (2, sys.stderr)):
        if stream is None:
            _occupy(fd)
    if sys.stdin is None:
        sys.stdin = _ClosedStdin()
    if not isinstance(sys.stdout, _Stdout):
        sys.stdout = _Stdout(sys.stdout)
    if not isinstance(sys.stderr, _Stderr):
        sys.stderr = _Stderr(sys.stderr)


def closed_at_start(stream: object) -> bool:
    """Whether ``stream`` (``sys.stdin`` or ``sys.stdout``) was closed when the command started."""
    return getattr(stream, "closed_at_start", False)


def _occupy(fd: int) -> None:
    try:
        os.fstat(fd)
    except OSError:
        devnull = os.open(os.devnull, os.O_RDWR)
        if devnull != fd:
            os.dup2(devnull, fd)
            os.close(devnull)
