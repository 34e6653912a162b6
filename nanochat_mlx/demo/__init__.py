"""The built-in demo model (``--source demo``): a tiny g9 nanochat model shipped inside the package.

It was trained from scratch by ``python -m benchmarks.demo.build`` (our own tokenizer, pretraining
on Shakespeare, then chat data: arithmetic through the calculator, who it is, spelling, chit-chat),
so that the CLI, TUI and server chat at once, offline. Its quality figures travel in its meta.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

SOURCE = "demo"
MODEL_DIR = Path(__file__).resolve().parent / "model"
REAL_MODEL_HINT = "for a real model: nanochat-mlx models, or --source hf:karpathy/nanochat-d32"


def demo_files(step: int | None = None):
    """The demo checkpoint's files, named ``demo`` in messages."""
    from ..sources import resolve_folder

    if not MODEL_DIR.is_dir():
        raise CheckpointError(f"demo: the built-in model is missing from {MODEL_DIR} (a broken install?)")
    return resolve_folder(MODEL_DIR, step, origin=SOURCE)


def demo_meta() -> dict[str, Any]:
    """The ``demo`` section of the shipped meta: build times and quality figures (empty if absent)."""
    try:
        meta = json.loads(next(MODEL_DIR.glob("meta_*.json")).read_text(encoding="utf-8"))
    except (StopIteration, OSError, ValueError):
        return {}
    demo = meta.get("demo") if isinstance(meta, dict) else None
    return demo if isinstance(demo, dict) else {}


def describe(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """``info`` rows for a checkpoint whose meta carries a ``demo`` section (else none)."""
    demo = meta.get("demo")
    if not isinstance(demo, dict):
        return []
    figures = demo.get("figures") or {}
    rows = [("about", "the built-in demo model: tiny, trained in minutes on a CPU; " + REAL_MODEL_HINT)]
    if "val_bpb" in figures:
        after = f" ({figures['pretrain_val_bpb']:.2f} before the chat phase)" if "pretrain_val_bpb" in figures else ""
        rows.append(("val bpb", f"{figures['val_bpb']:.2f} bits per byte on held-out Shakespeare{after}"))
    arithmetic = figures.get("arithmetic") or {}
    if "accuracy" in arithmetic:
        ops = ", ".join(f"{op} {acc:.0%}" for op, acc in (arithmetic.get("by_operation") or {}).items())
        rows.append(
            (
                "arithmetic",
                f"{arithmetic['accuracy']:.1%} of {arithmetic.get('questions', '?')} held-out two-operand questions "
                f"(up to 4 digits) through the calculator, greedy ({ops})",
            )
        )
    spelling = figures.get("spelling") or {}
    if "accuracy" in spelling:
        sample, drilled = spelling.get("words", "?"), spelling.get("of", "?")
        rows.append(
            (
                "spelling",
                f"{spelling['accuracy']:.0%} of a sample of {sample} of the {drilled} words it was drilled on, "
                "spelled letter by letter, greedy",
            )
        )
    seconds = demo.get("build_seconds") or {}
    if seconds:
        rows.append(("built in", f"{sum(seconds.values()) / 60:.0f} min on a CPU (python -m benchmarks.demo.build)"))
    return rows
