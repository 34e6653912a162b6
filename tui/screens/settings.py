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


MAX_TOKENS_HINT = "(empty = up to the context)"


class FieldError(NanochatError):
    """A value the dialog can't take; ``field`` is the id of its input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _number(field: str, label: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FieldError(field, f"{label}: enter a number") from None


def _whole(field: str, label: str, text: str, hint: str) -> int | None:
    """A whole number; None for an empty field (or 'off', 'none')."""
    text = text.strip().lower()
    if text in ("", "none", "off"):
        return None
    try:
        return int(text)
    except ValueError:
        raise FieldError(field, f"{label}: enter a whole number {hint}") from None


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
        """The settings as typed; raises NanochatError (FieldError naming the field) for a bad value."""
        value = lambda name: self.query_one(f"#set-{name}", Input).value  # noqa: E731
        temperature = _number("temperature", "Temperature", value("temperature"))
        top_k = _whole("top-k", "Top-k", value("top-k"), "(0 = off)")
        top_p = _number("top-p", "Top-p", value("top-p"))
        max_tokens = _whole("max-tokens", "Max tokens", value("max-tokens"), MAX_TOKENS_HINT)
        if max_tokens is not None and max_tokens < 1:  # 0 would give an empty reply every time
            raise FieldError("max-tokens", f"Max tokens: enter 1 or more {MAX_TOKENS_HINT}")
        seed = _whole("seed", "Seed", value("seed"), "(empty = random)")
        params = self.params.with_(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens, seed=seed)
        system = self.query_one("#set-system", TextArea).text.strip() or None
        return Settings(params, system)

    def action_save(self) -> None:
        try:
            settings = self.read()
        except NanochatError as e:
            self.query_one("#settings-error", Label).update(str(e))
            if isinstance(e, FieldError):
                self.query_one(f"#set-{e.field}", Input).focus()
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
