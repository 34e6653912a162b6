"""The model picker: every model there is to chat with (``nanochat_mlx.models.discover``), or any source typed in."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option, OptionDoesNotExist

from nanochat_mlx.models import GROUPS, ModelChoice, discover, human_size

HINT = "Enter load · Tab: type a source · Esc close"
PLACEHOLDER = "or type a source: a folder path, hf:owner/name, nanochat:sft/d20"
GROUP_ROW = "group:"  # option ids of the group headings (disabled: they can't be picked)


class ModelsScreen(ModalScreen[str | None]):
    """Pick a model; dismisses with its source (None: keep the current one)."""

    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, current: str | None = None, folders: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.current = current
        self.folders = folders
        self.choices: dict[str, ModelChoice] = {}

    def compose(self) -> ComposeResult:
        with Vertical(id="models-card", classes="dialog"):
            yield Label("Models", classes="dialog-title")
            yield OptionList(id="models-list")
            yield Input(placeholder=PLACEHOLDER, id="models-source")
            yield Label(HINT, id="models-hint", classes="dialog-hint")

    def on_mount(self) -> None:
        menu = self.query_one(OptionList)
        choices = discover(self.folders, last=self.current)
        self.choices = {c.source: c for c in choices}
        for group, title in GROUPS.items():
            members = [c for c in choices if c.group == group]
            if members:
                menu.add_option(Option(Text(title, style="bold"), id=GROUP_ROW + group, disabled=True))
            menu.add_options(Option(self._prompt(c), id=c.source) for c in members)
        try:
            menu.highlighted = menu.get_option_index(self.current or "")
        except OptionDoesNotExist:
            menu.action_first()
        menu.focus()

    def _prompt(self, c: ModelChoice) -> Text:
        """Two lines: the source (● the open one) and its size; then its detail, or why it can't be loaded."""
        here = c.source == self.current
        text = Text("● " if here else "  ", style="bold green")
        text.append(c.source, style="bold" if here else "")
        if c.size_bytes is not None:
            text.append(f"  {human_size(c.size_bytes, estimated=not c.downloaded)}", style="cyan")
        text.append("\n    ")
        if c.problem:
            text.append(c.problem, style="red")
        else:
            text.append(c.detail, style="dim")
        return text

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        choice = self.choices[event.option.id or ""]
        if choice.problem:
            self.notify(choice.problem, severity="error", timeout=6)
            return
        self.dismiss(choice.source)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        source = event.value.strip()
        if source:
            self.dismiss(source)

    def action_close(self) -> None:
        self.dismiss(None)
