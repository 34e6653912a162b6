"""The status bar: model, generation, backend, precision, context and live speed."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label


@dataclass
class Speed:
    """Timing numbers for the status bar (live while generating, the engine's stats after)."""

    tokens: int = 0
    tps: float = 0.0
    ttft_s: float | None = None
    peak_bytes: int | None = None


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class StatusBar(Horizontal):
    """One line of labelled facts; timings show as "–" when ``show_timing`` is off (tests)."""

    def __init__(self, *, show_timing: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.show_timing = show_timing

    def compose(self) -> ComposeResult:
        yield Label("", id="st-model", classes="pill")
        yield Label("", id="st-gen", classes="pill")
        yield Label("", id="st-backend", classes="pill")
        yield Label("", id="st-dtype", classes="pill")
        yield Label("", id="st-ctx", classes="pill")
        yield Label("", id="st-state", classes="pill")
        yield Label("", id="st-tps", classes="pill")
        yield Label("", id="st-ttft", classes="pill")
        yield Label("", id="st-mem", classes="pill")

    def set_model(self, name: str, generation: str, backend: str, precision: str) -> None:
        self.query_one("#st-model", Label).update(f"◆ {name}")
        self.query_one("#st-gen", Label).update(generation)
        self.query_one("#st-backend", Label).update(backend)
        self.query_one("#st-dtype", Label).update(precision)

    def set_context(self, used: int, limit: int) -> None:
        frac = min(used / max(limit, 1), 1.0)
        filled = round(frac * 8)
        bar = "█" * filled + "░" * (8 - filled)
        label = self.query_one("#st-ctx", Label)
        label.update(f"ctx {used}/{limit} {bar}")
        label.set_class(frac > 0.8, "-warn")

    def set_state(self, generating: bool) -> None:
        label = self.query_one("#st-state", Label)
        label.update("● generating" if generating else "")
        label.display = generating

    def set_speed(self, speed: Speed | None) -> None:
        def show(value: str) -> str:
            return value if self.show_timing else "–"

        tps = ttft = mem = "–"
        if speed is not None:
            tps = show(f"{speed.tps:.1f}")
            ttft = show(f"{speed.ttft_s * 1000:.0f} ms") if speed.ttft_s is not None else "–"
            mem = show(format_bytes(speed.peak_bytes)) if speed.peak_bytes is not None else "–"
        self.query_one("#st-tps", Label).update(f"{tps} tok/s")
        self.query_one("#st-ttft", Label).update(f"ttft {ttft}")
        self.query_one("#st-mem", Label).update(f"peak {mem}")
