"""Settings: sampling parameters and the system prompt."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from nanochat_mlx.errors import NanochatError
from nanochat_mlx.sampling import SamplingParams


@dataclass
class Settings:
    params: SamplingParams
    system: str | None


# How each sampling setting is named and shown, in the order the dialog lists them.
_LABELS = {
    "temperature": "temperature",
    "top_k": "top-k",
    "top_p": "top-p",
    "min_p": "min-p",
    "repetition_penalty": "repetition penalty",
    "max_tokens": "max tokens",
    "seed": "seed",
}
_UNSET = {"top_k": "off", "max_tokens": "up to the context", "seed": "random"}


def differences(old: SamplingParams, new: SamplingParams) -> str:
    """``"temperature 0.9, top-k 7"``: the settings of ``new`` that differ from ``old`` ("" when none do)."""
    changed = []
    for name, label in _LABELS.items():
        value = getattr(new, name)
        if value != getattr(old, name):
            shown = _UNSET[name] if value is None else f"{value:g}" if isinstance(value, float) else str(value)
            changed.append(f"{label} {shown}")
    return ", ".join(changed)


def _optional_int(text: str) -> int | None:
    text = text.strip().lower()
    return None if text in ("", "none", "off") else int(text)


class SettingsScreen(ModalScreen[Settings | None]):
    """Edit temperature, top-k, top-p, max tokens, seed and the system prompt; Ctrl+S saves."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, params: SamplingParams, system: str | None) -> None:
        super().__init__()
        self.params = params
        self.system = system

    def compose(self) -> ComposeResult:
        p = self.params
        with Vertical(id="settings-card", classes="dialog"):
            yield Label("Settings", classes="dialog-title")
            with VerticalScroll(id="settings-fields"), Grid(id="settings-grid"):
                yield Label("Temperature", classes="field-label")
                yield Input(str(p.temperature), id="set-temperature", type="number", compact=True)
                yield Label("Top-k", classes="field-label")
                yield Input("" if p.top_k is None else str(p.top_k), id="set-top-k", placeholder="off", compact=True)
                yield Label("Top-p", classes="field-label")
                yield Input(str(p.top_p), id="set-top-p", type="number", compact=True)
                yield Label("Max tokens", classes="field-label")
                max_tokens = "" if p.max_tokens is None else str(p.max_tokens)
                yield Input(max_tokens, id="set-max-tokens", placeholder="up to the context", compact=True)
                yield Label("Seed", classes="field-label")
                yield Input("" if p.seed is None else str(p.seed), id="set-seed", placeholder="random", compact=True)
                yield Label("System prompt", classes="field-label")
                yield TextArea(self.system or "", id="set-system", soft_wrap=True, compact=True)
            yield Label("", id="settings-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="settings-save")
                yield Button("Cancel", id="settings-cancel")

    def on_mount(self) -> None:
        self.query_one("#set-temperature", Input).focus()

    def read(self) -> Settings:
        """The settings as typed; raises NanochatError (or ValueError) for a bad value."""
        value = lambda name: self.query_one(f"#set-{name}", Input).value  # noqa: E731
        try:
            params = self.params.with_(
                temperature=float(value("temperature")),
                top_k=_optional_int(value("top-k")),
                top_p=float(value("top-p")),
                max_tokens=_optional_int(value("max-tokens")),
                seed=_optional_int(value("seed")),
            )
        except ValueError as e:
            raise NanochatError(f"not a number: {e}".replace("could not convert string to float: ", "")) from None
        system = self.query_one("#set-system", TextArea).text.strip() or None
        return Settings(params, system)

    def action_save(self) -> None:
        try:
            settings = self.read()
        except NanochatError as e:
            self.query_one("#settings-error", Label).update(str(e))
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "settings-save":
            self.action_save()
        else:
            self.action_cancel()
