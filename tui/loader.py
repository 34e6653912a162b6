"""The thread every model call runs on, and how the app words a failure."""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from nanochat_mlx.backends import pick_backend
from nanochat_mlx.checkpoint import Checkpoint, read_checkpoint
from nanochat_mlx.errors import NanochatError
from nanochat_mlx.loading import STAGES, Progress, ProgressCallback
from nanochat_mlx.options import LoadOptions

T = TypeVar("T")


class ModelThread:
    """One long-lived daemon thread for every model call (load, generate).

    MLX streams are thread-local (mlx >= 0.31.2): arrays made on one thread can't be evaluated on
    another, so loading and generation must share a thread; Textual workers would each get a new one.
    It is a daemon thread and nothing ever joins it, so a call that can't be interrupted (a
    download's retries, a forward pass) never holds up quitting.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # calls queued or running
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._serve, name="nanochat-model", daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the model thread; cancelling the caller doesn't interrupt the call."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._jobs.put((fn, args, loop, future))
        return await future

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the calls queued so far to end; False if one still runs."""
        return self._idle.wait(timeout)

    def shutdown(self) -> None:
        """Let the thread end once the call in progress (if any) returns."""
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, loop, future = job
            result = error = None
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which reports it
                error = exc
            with self._lock:
                self._pending -= 1
                if not self._pending:
                    self._idle.set()
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the app's event loop has closed (it quit): nobody waits for this
                pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


def describe_error(exc: BaseException) -> str:
    """One line for the user: our own errors as they are, anything else with its type."""
    if isinstance(exc, NanochatError):
        text = str(exc)
    elif isinstance(exc, ModuleNotFoundError):
        text = f"missing module {exc.name!r}: this backend isn't available in this install"
    elif isinstance(exc, (OSError, MemoryError)):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = f"unexpected {type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class LoadCancelled(Exception):
    """The user cancelled a model switch (raised in a download's progress hook, to stop it)."""


def read_for_switch(options: LoadOptions, report: ProgressCallback, cancelled: threading.Event) -> Checkpoint:
    """The checkpoint step of ``load_model`` (download included), stopping at the next chunk once ``cancelled``.

    It reads numpy arrays only, so it may run off the model thread (on one the app can abandon).
    """
    pick_backend(options.backend)  # refuse an unusable backend before downloading anything
    report(Progress("checkpoint", STAGES["checkpoint"]))

    def downloading(name: str, done: int, total: int) -> None:
        if cancelled.is_set():
            raise LoadCancelled
        report(Progress("checkpoint", f"Downloading {name}", done, total))

    return read_checkpoint(options.source, step=options.step, arch=options.arch, progress=downloading)


async def on_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a new daemon thread; cancelling the caller abandons it (a stalled download can't hold us)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def target() -> None:
        result = error = None
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which reports it
            error = exc
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:  # the app's event loop has closed
            pass

    threading.Thread(target=target, name="nanochat-download", daemon=True).start()
    return await future
