"""The status bar: state, speed, context, model facts — as many as fit, the most useful first."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from nanochat_mlx.engine import GenerationStats

# Shown left to right in this order; when the line is too narrow the highest rank goes first.
ORDER = ("model", "generation", "backend", "precision", "context", "state", "speed", "ttft", "peak")
RANK = {"state": 0, "speed": 1, "context": 2, "model": 3, "ttft": 4, "peak": 5, "generation": 6, "precision": 7}
STYLED = {k: f"status--{k}" for k in ("model", "generation", "state", "speed")}


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def context_bar(used: int, limit: int) -> str:
    frac = min(used / max(limit, 1), 1.0)
    filled = round(frac * 8)
    return f"ctx {used}/{limit} " + "█" * filled + "░" * (8 - filled)


class StatusBar(Widget):
    """One line of facts; timings show as "–" when ``show_timing`` is off (tests and snapshots)."""

    COMPONENT_CLASSES = {"status--model", "status--generation", "status--state", "status--speed", "status--warn"}

    def __init__(self, *, show_timing: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.show_timing = show_timing
        self.facts: dict[str, str] = {}
        self.context_warn = False

    def set_model(self, name: str, generation: str, backend: str, precision: str) -> None:
        self.facts.update(model=f"◆ {name}", generation=generation, backend=backend, precision=precision)
        self.refresh()

    def set_context(self, used: int, limit: int) -> None:
        self.facts["context"] = context_bar(used, limit)
        self.context_warn = used > 0.8 * limit
        self.refresh()

    def set_state(self, state: str) -> None:
        """ "● generating", "reading prompt 512/900", or "" when idle."""
        self.facts["state"] = state
        self.refresh()

    def set_stats(self, stats: GenerationStats | None) -> None:
        """Speed, time to first token and peak memory from the engine's running stats."""

        def timing(value: str) -> str:
            return value if self.show_timing and stats is not None else "–"

        decoding = stats is not None and stats.generated_tokens > 0
        self.facts["speed"] = timing(f"{stats.decode_tps:.1f}" if decoding else "–") + " tok/s"
        self.facts["ttft"] = "ttft " + timing(f"{stats.ttft_s * 1000:.0f} ms" if decoding else "–")
        self.facts["peak"] = "peak " + timing(format_bytes(stats.peak_memory_bytes) if stats else "–")
        self.refresh()

    def pills(self, width: int) -> list[str]:
        """The facts that fit in ``width`` cells (each takes its text, two of padding and a gap)."""
        shown = [k for k in ORDER if self.facts.get(k)]
        while shown and sum(len(self.facts[k]) + 3 for k in shown) - 1 > width:
            shown.remove(max(shown, key=lambda k: RANK.get(k, len(RANK))))
        return shown

    def render(self) -> Text:
        line = Text(no_wrap=True, overflow="crop")
        for i, key in enumerate(self.pills(self.content_size.width)):
            component = STYLED.get(key)
            if key == "context" and self.context_warn:
                component = "status--warn"
            style = self.get_component_rich_style(component) if component else ""
            line.append(" " if i else "")
            line.append(f" {self.facts[key]} ", style)
        return line
