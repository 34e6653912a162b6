"""Loading a model for the app, on the one thread that runs every model call."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from nanochat_mlx.engine import Engine
from nanochat_mlx.errors import NanochatError

T = TypeVar("T")

# (stage key, what the loading screen says while it runs)
STAGES = (
    ("checkpoint", "Find and read the checkpoint (downloading from the Hub if needed)"),
    ("model", "Build the model"),
    ("engine", "Start the engine"),
)


class ModelThread:
    """One long-lived thread for every model call (load, generate).

    MLX streams are thread-local (mlx >= 0.31.2): arrays made on one thread can't be evaluated on
    another, so loading and generation must share a thread; Textual workers would each get a new one.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanochat-model")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class LoadOptions:
    """Which model to load and how (the CLI's model options)."""

    source: str
    step: int | None = None
    arch: str | None = None
    dtype: str | None = None
    quantize: int | None = None
    backend: str = "auto"

    def with_source(self, source: str) -> LoadOptions:
        return replace(self, source=source)


@dataclass
class LoadedModel:
    """A model ready to chat with, and what the status bar says about it."""

    options: LoadOptions
    checkpoint: Any  # nanochat_mlx.checkpoint.Checkpoint
    engine: Engine
    seconds: float

    @property
    def name(self) -> str:
        return short_name(self.checkpoint.files.origin)

    @property
    def generation(self) -> str:
        return self.checkpoint.spec.name

    @property
    def backend(self) -> str:
        return f"{self.engine.runner.name} · {self.engine.runner.device}"

    @property
    def precision(self) -> str:
        bits = self.options.quantize or (self.checkpoint.quantization or {}).get("bits")
        return self.engine.runner.dtype + (f" · q{bits}" if bits else "")

    @property
    def n_params(self) -> int:
        return self.checkpoint.n_params


def short_name(origin: str) -> str:
    """A source as people call it: the repo for hf:, the folder name for paths."""
    if origin.startswith("hf:"):
        return origin[3:].split("@")[0]
    if origin.startswith("nanochat:"):
        return origin
    path = Path(origin)
    if path.suffix in (".pt", ".safetensors"):
        path = path.parent
    return path.name or str(origin)


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


def load_model(options: LoadOptions, stage: Callable[[str], None]) -> LoadedModel:
    """Resolve, read, build: calls ``stage(key)`` as each of :data:`STAGES` starts."""
    from nanochat_mlx.checkpoint import read_checkpoint
    from nanochat_mlx.loading import build_model, check_options

    start = time.perf_counter()
    check_options(options.dtype, options.quantize)
    stage("checkpoint")
    ckpt = read_checkpoint(options.source, step=options.step, arch=options.arch)
    stage("model")
    model = build_model(ckpt, dtype=options.dtype, quantize=options.quantize, backend=options.backend)
    stage("engine")
    engine = Engine(model, ckpt.tokenizer)
    return LoadedModel(options, ckpt, engine, time.perf_counter() - start)


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
