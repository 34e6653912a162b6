"""The list of saved conversations, to reopen (Enter) or delete (Delete) one."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from ..storage import ConversationStore


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


class ConversationsScreen(ModalScreen[str | None]):
    """Pick a saved chat; dismisses with its id."""

    BINDINGS = [
        Binding("escape", "dismiss_none", "Close"),
        Binding("delete", "delete", "Delete"),
    ]

    def __init__(self, store: ConversationStore, current: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="conversations-card", classes="dialog"):
            yield Label("Conversations", classes="dialog-title")
            yield DataTable(id="conversations-table", cursor_type="row", zebra_stripes=True)
            yield Label("Enter open · Delete remove · Esc close", classes="dialog-hint")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("Title", "Turns", "Model", "Updated")
        self._fill()
        table.focus()

    def _fill(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        convs = self.store.list()
        for conv in convs:
            title = Text(conv.display_title, style="bold" if conv.id == self.current else "")
            table.add_row(title, str(len(conv.turns)), conv.generation or "", _when(conv.updated), key=conv.id)
        if not convs:
            self.query_one(".dialog-hint", Label).update("No saved conversations yet · Esc close")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.dismiss(event.row_key.value)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    def action_delete(self) -> None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        if key and key != self.current:
            self.store.delete(key)
            self._fill()
            self.notify("Conversation deleted", timeout=2)
        elif key == self.current:
            self.notify("That's the open chat; start a new one first (Ctrl+N)", severity="warning")
