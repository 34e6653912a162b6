"""Error screen: why the model couldn't be loaded (one line, no traceback) and a field to try another source."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Center, Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Collapsible, Footer, Input, Label, Static


class ErrorScreen(Screen):
    """A failed load: the message, the source that failed, and a way to load another one."""

    def __init__(self, message: str, source: str, details: str | None = None) -> None:
        super().__init__()
        self.message = message
        self.source = source
        self.details = details

    def compose(self) -> ComposeResult:
        with Center(), Vertical(id="error-card", classes="card"):
            yield Label("✖  Couldn't load the model", id="error-title")
            yield Static(Text(self.message), id="error-message")
            if self.details:
                with Collapsible(title="Traceback (--debug)", collapsed=True):
                    yield Static(Text(self.details), id="error-details")
            yield Label("Try another source: a folder, hf:owner/name or nanochat:sft", id="error-hint")
            yield Input(self.source, placeholder="source", id="error-source")
            with Horizontal(id="error-buttons"):
                yield Button("Load", variant="primary", id="error-load")
                yield Button("Quit", variant="error", id="error-quit")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#error-source", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._retry(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "error-load":
            self._retry(self.query_one("#error-source", Input).value)
        else:
            self.app.exit(1, return_code=1)

    def _retry(self, source: str) -> None:
        if source.strip():
            self.app.load(source.strip())
