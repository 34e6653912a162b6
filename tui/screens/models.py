"""The model picker: every model there is to chat with (``nanochat_mlx.models.discover``), or any source typed in."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Label

from nanochat_mlx.models import GROUPS, ModelChoice, discover, human_size

HINT = "Enter load · Tab: type any source (a folder, hf:owner/name) · Esc close"
PLACEHOLDER = "or type a source: a folder path, hf:owner/name, nanochat:sft/d20"
GROUP_ROW = "group:"  # row keys of the group headings, which can't be picked


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
            yield DataTable(id="models-table", cursor_type="row", show_header=False)
            yield Input(placeholder=PLACEHOLDER, id="models-source")
            yield Label(HINT, id="models-hint", classes="dialog-hint")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("", "Source", "Size", "Detail")
        choices = discover(self.folders, last=self.current)
        self.choices = {c.source: c for c in choices}
        for group, title in GROUPS.items():
            members = [c for c in choices if c.group == group]
            if members:
                table.add_row("", Text(title, style="bold"), "", "", key=GROUP_ROW + group)
            for c in members:
                table.add_row(*self._cells(c), key=c.source)
        current = next((i for i, c in enumerate(table.rows) if c.value == self.current), None)
        table.move_cursor(row=current if current is not None else 1)
        table.focus()

    def _cells(self, c: ModelChoice) -> tuple[Text, Text, str, Text]:
        here = c.source == self.current
        mark = Text("●" if here else " ", style="bold green")
        source = Text(c.source, style="bold" if here else "")
        size = human_size(c.size_bytes, estimated=not c.downloaded)
        detail = Text(c.problem, style="red") if c.problem else Text(c.detail, style="dim")
        return mark, source, size, detail

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        choice = self.choices.get(event.row_key.value or "")
        if choice is None:  # a group heading
            return
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
