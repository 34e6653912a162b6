"""Loading screen: the stages of loading a model, download progress from the Hub, elapsed time."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Label, ProgressBar, Static

from nanochat_mlx.loading import STAGES, Progress
from nanochat_mlx.models import human_size

_PERCENT = re.compile(r"(\d{1,3})%")


class LoadingScreen(Screen):
    """Shows which stage of the load is running; captured stderr (huggingface_hub's tqdm bars) as progress."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", tooltip="Stop loading and keep the model already open")]

    @dataclass
    class Stage(Message):
        progress: Progress

    def __init__(self, source: str, backend: str, *, cancellable: bool = False) -> None:
        """``cancellable``: switching models, with one to go back to (the first load has none)."""
        super().__init__()
        self.source = source
        self.backend = backend
        self.cancellable = cancellable
        self.cancelled = threading.Event()
        self.current: str | None = None
        self.started = time.monotonic()

    def compose(self) -> ComposeResult:
        with Center(), Vertical(id="loading-card", classes="card"):
            yield Label("nanochat-mlx", id="loading-title")
            yield Label(Text(self.source), id="loading-source")
            yield Static(id="loading-stages")
            yield ProgressBar(total=None, show_eta=False, id="loading-progress")
            yield Label("", id="loading-detail")
            yield Label("", id="loading-elapsed")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.cancellable if action == "cancel" else True

    def action_cancel(self) -> None:
        """Esc: stop waiting for the load (a download stops at its next chunk) and go back to the chat."""
        self.cancelled.set()
        self.dismiss()

    def on_mount(self) -> None:
        self._render_stages()
        self.set_interval(0.5, self._tick)
        self.app.begin_capture_print(self, stdout=False, stderr=True)

    def on_unmount(self) -> None:
        self.app.end_capture_print(self)

    def _tick(self) -> None:
        self.query_one("#loading-elapsed", Label).update(f"{time.monotonic() - self.started:.0f} s")

    def on_loading_screen_stage(self, message: Stage) -> None:
        progress = message.progress
        bar = self.query_one("#loading-progress", ProgressBar)
        if progress.stage != self.current:
            self.current = progress.stage
            self._render_stages()
            self.query_one("#loading-detail", Label).update("")
            bar.update(total=None, progress=0)
        if progress.total:
            bar.update(total=progress.total, progress=progress.done)
            sizes = f"{human_size(progress.done)} of {human_size(progress.total)}"
            self.query_one("#loading-detail", Label).update(Text(f"{progress.message} · {sizes}"))

    def on_print(self, event: events.Print) -> None:
        """A line a download progress bar wrote to stderr: show it, and its percentage on the bar."""
        line = event.text.replace("\r", "\n").strip().splitlines()
        if not line:
            return
        text = line[-1].strip()
        self.query_one("#loading-detail", Label).update(Text(text[:100]))
        if m := _PERCENT.search(text):
            self.query_one("#loading-progress", ProgressBar).update(total=100, progress=min(int(m.group(1)), 100))

    def _render_stages(self) -> None:
        keys = list(STAGES)
        now = keys.index(self.current) if self.current in keys else -1
        out = Text()
        for i, (key, title) in enumerate(STAGES.items()):
            if key == "model":
                title = f"{title} ({self.backend} backend)"
            if i < now:
                out.append("  ✓ ", "green bold").append(title + "\n", "dim")
            elif i == now:
                out.append("  ▸ ", "bold").append(title + "\n", "bold")
            else:
                out.append("  · ", "dim").append(title + "\n", "dim")
        self.query_one("#loading-stages", Static).update(out)
