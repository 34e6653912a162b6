"""The one load path: options -> checkpoint files -> canonical weights -> backend model -> Engine.

Every front end (CLI, TUI, server, trainer, benchmark) loads through :func:`load_model`, which
returns a :class:`LoadedModel`: the model, its tokenizer and engine, and the facts front ends
show about it. ``load`` is the short public form returning ``(model, tokenizer)``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, read_checkpoint
from .demo import describe as describe_demo
from .engine import Engine
from .options import LoadOptions
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Progress:
    """A load stage starting, or a download advancing (``done``/``total`` count its bytes)."""

    stage: str  # "checkpoint", "model" or "engine"
    message: str
    done: int = 0
    total: int = 0


STAGES = {
    "checkpoint": "Find and read the checkpoint (downloading from the Hub if needed)",
    "model": "Build the model",
    "engine": "Start the engine",
}

ProgressCallback = Callable[[Progress], None]


@dataclass
class LoadedModel:
    """A model ready to generate with, and what front ends say about it."""

    options: LoadOptions
    checkpoint: Checkpoint
    model: Any  # the backend's model (mlx-lm protocol; torch tensors on the torch backend)
    engine: Engine
    seconds: float

    @property
    def tokenizer(self) -> Tokenizer:
        return self.checkpoint.tokenizer

    @property
    def backend(self) -> str:
        return self.engine.runner.name

    @property
    def device(self) -> str:
        return self.engine.runner.device

    @property
    def dtype(self) -> str:
        return self.engine.runner.dtype

    @property
    def quantization(self) -> int | None:
        """Bits of quantized weights, or None."""
        return self.model.quantization

    @property
    def source(self) -> str:
        return self.checkpoint.files.origin

    @property
    def name(self) -> str:
        return short_name(self.source)

    @property
    def generation(self) -> str:
        return self.checkpoint.spec.name

    @property
    def n_params(self) -> int:
        return self.checkpoint.n_params

    @property
    def context_limit(self) -> int:
        return self.checkpoint.config.context_limit

    @property
    def precision(self) -> str:
        """``float32``, or ``bfloat16 · q4`` for a quantized model."""
        return self.dtype + (f" · q{self.quantization}" if self.quantization else "")

    @property
    def description(self) -> str:
        """One line: source, generation, size, backend, device, precision."""
        return (
            f"{self.source} ({self.generation}, {self.n_params / 1e6:.1f}M params) "
            f"on {self.backend} {self.device} {self.precision}"
        )


def load_model(options: LoadOptions, progress: ProgressCallback | None = None) -> LoadedModel:
    """Load ``options.source`` on its backend; ``progress`` hears each stage as it starts."""
    from .backends import pick_backend

    report = progress or (lambda p: None)
    start = time.perf_counter()
    pick_backend(options.backend)  # refuse an unusable backend before reading anything
    report(Progress("checkpoint", STAGES["checkpoint"]))

    def downloading(name: str, done: int, total: int) -> None:
        report(Progress("checkpoint", f"Downloading {name}", done, total))

    # Without a listener the Hub's own progress bars go to stderr (the CLI's default).
    ckpt = read_checkpoint(
        options.source, step=options.step, arch=options.arch, progress=downloading if progress else None
    )
    return from_checkpoint(ckpt, options, report, start)


def from_checkpoint(
    ckpt: Checkpoint, options: LoadOptions, progress: ProgressCallback | None = None, start: float | None = None
) -> LoadedModel:
    """Build the model and engine for a checkpoint already read (``options.source`` is not re-read)."""
    from .backends import build_model, pick_backend

    report = progress or (lambda p: None)
    start = time.perf_counter() if start is None else start
    report(Progress("model", STAGES["model"]))
    model = build_model(ckpt, pick_backend(options.backend, ckpt), dtype=options.dtype, quantize=options.quantize)
    report(Progress("engine", STAGES["engine"]))
    engine = Engine(model, ckpt.tokenizer)
    return LoadedModel(options, ckpt, model, engine, time.perf_counter() - start)


def load(
    source: str,
    *,
    step: int | None = None,
    arch: str | None = None,
    dtype: str | None = None,
    quantize: int | None = None,
    backend: str = "mlx",
) -> tuple[Any, Tokenizer]:
    """Load a nanochat checkpoint as ``(model, tokenizer)``.

    ``dtype`` defaults to float32 on CPUs and bfloat16 on GPUs; ``quantize`` (4 or 8) quantizes
    the linear and embedding layers; ``backend`` is "mlx", "torch" or "auto".
    """
    loaded = load_model(LoadOptions(source, step, arch, dtype, quantize, backend))
    return loaded.model, loaded.tokenizer


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


def describe_checkpoint(ckpt: Checkpoint) -> list[tuple[str, str]]:
    """What ``info`` prints about a checkpoint: (label, value) rows."""
    c, spec, files = ckpt.config, ckpt.spec, ckpt.files
    windows = c.window_sizes(spec)
    dtypes = Counter(str(w.dtype) for w in ckpt.weights.values())
    rows = [
        ("source", ckpt.name),
        ("layout", files.layout + (f", step {files.step}" if files.step is not None else "")),
        *(("file", str(p)) for p in [*files.weights, files.meta or files.config, files.tokenizer] if p),
        ("generation", f"{spec.name}: {spec.summary}"),
        ("decided by", ckpt.how),
        (
            "config",
            f"n_layer={c.n_layer} n_embd={c.n_embd} n_head={c.n_head} n_kv_head={c.n_kv_head} "
            f"head_dim={c.head_dim} sequence_len={c.sequence_len} vocab_size={c.vocab_size} "
            f"(rows {c.padded_vocab_size})",
        ),
        ("parameters", f"{ckpt.n_params:,}"),
        (
            "windows",
            ("none (full causal)" if windows[0] is None else ", ".join(str(w) for w in windows))
            + (f"  (pattern {c.window_pattern})" if spec.windowed else ""),
        ),
        ("value embeds", str(c.ve_layers(spec) or "none")),
        ("dtypes", f"{', '.join(f'{n} {d}' for d, n in sorted(dtypes.items()))} tensors"),
        (
            "rotary",
            f"base {spec.rope_base:g}, {'bfloat16' if spec.rope_table_bf16 else 'float32'} tables; "
            f"softcap {spec.softcap:g}",
        ),
        ("tokenizer", f"{ckpt.tokenizer.vocab_size} tokens, bos {ckpt.tokenizer.get_bos_token_id()}"),
        ("context", f"{c.sequence_len} trained, {c.context_limit} max"),
    ]
    if ckpt.quantization:
        rows.append(("quantization", f"{ckpt.quantization['bits']}-bit, group {ckpt.quantization['group_size']}"))
    rows += describe_demo(ckpt.meta)
    rows += [("note", n) for n in ckpt.notes]
    return rows
