"""The list of saved conversations, to reopen (Enter) or delete (Delete, twice) one."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from ..storage import ConversationStore, Unreadable

HINT = "Enter open · Delete remove · Esc close"
UNREADABLE = "unreadable:"  # row keys of files that can't be opened


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


class ConversationsScreen(ModalScreen[str | None]):
    """Pick a saved chat; dismisses with its id. Unreadable files are listed, never opened or deleted.

    With ``match``, only the chats that name picks (``/load NAME`` when several do).
    """

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("delete", "delete", "Delete"),
    ]

    def __init__(self, store: ConversationStore, current: str | None = None, match: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.current = current
        self.match = match
        self.unreadable: dict[str, Unreadable] = {}
        self.titles: dict[str, str] = {}
        self.armed: str | None = None  # the row a first Delete asked about
        self.title_width: int | None = None  # titles longer than this end in … (None: not laid out yet)

    def compose(self) -> ComposeResult:
        with Vertical(id="conversations-card", classes="dialog"):
            title = f"Conversations matching “{self.match}”" if self.match else "Conversations"
            yield Label(Text(title), classes="dialog-title")
            yield DataTable(id="conversations-table", cursor_type="row", zebra_stripes=True)
            yield Label(HINT, id="conversations-hint", classes="dialog-hint")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        self._fill()
        table.focus()

    def on_resize(self) -> None:
        """Cut titles to what the other columns leave of the table's width, so that they all show."""
        table = self.query_one(DataTable)
        others = sum(c.get_render_width(table) for key, c in table.columns.items() if key != "title")
        gutter = table.styles.scrollbar_size_vertical + 2 * table.cell_padding
        width = max(8, table.size.width - others - gutter)
        if width != self.title_width:
            self.title_width = width
            row = table.cursor_row
            self._fill()
            table.move_cursor(row=row)

    def _fill(self) -> None:
        table = self.query_one(DataTable)
        table.clear(columns=True)  # and so the columns' widths: the title's is measured anew
        table.add_column("Title", key="title")
        table.add_columns("Turns", "Model", "Updated")
        convs, bad = self.store.scan()
        if self.match:
            picked = {conv.id for conv in self.store.matches(self.match)}
            convs, bad = [conv for conv in convs if conv.id in picked], []
        self.titles = {conv.id: conv.display_title for conv in convs}
        for conv in convs:
            title = self._cut(Text(conv.display_title, style="bold" if conv.id == self.current else ""))
            table.add_row(title, str(len(conv.turns)), conv.generation or "", _when(conv.updated), key=conv.id)
        self.unreadable = {UNREADABLE + u.path.name: u for u in bad}
        for key, u in self.unreadable.items():
            table.add_row(self._cut(Text(f"⚠ {u.path.name}: unreadable", style="dim")), "", "", "", key=key)
        self._hint(HINT if convs or bad else "No saved conversations yet · Esc close")

    def _cut(self, title: Text) -> Text:
        if self.title_width is not None:
            title.truncate(self.title_width, overflow="ellipsis")
        return title

    def _hint(self, text: str) -> None:
        self.query_one("#conversations-hint", Label).update(Text(text))

    def _key(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._disarm()
        bad = self.unreadable.get(event.row_key.value or "")
        if bad is not None:
            self._hint(f"{bad.path}: {bad.reason} (left as it is)")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key in self.unreadable:
            self.notify(f"can't open {self.unreadable[key].path.name}: {self.unreadable[key].reason}", severity="error")
            return
        self.dismiss(key)

    def _disarm(self) -> None:
        if self.armed is not None:
            self.armed = None
            self._hint(HINT)

    def action_close(self) -> None:
        """Esc: cancel a pending delete, else close."""
        if self.armed is not None:
            self._disarm()
        else:
            self.dismiss(None)

    def action_delete(self) -> None:
        """The first Delete asks; a second one on the same row deletes."""
        key = self._key()
        if key is None:
            return
        if key in self.unreadable:
            self.notify("Unreadable files are left as they are; remove them by hand if you want", severity="warning")
            return
        if key == self.current:
            self.notify("That's the open chat; start a new one first (Ctrl+N)", severity="warning")
            return
        if self.armed != key:
            self.armed = key
            self._hint(f"Delete “{self.titles[key]}”? Press Delete again to delete it, Esc to keep it")
            return
        self.armed = None
        try:
            self.store.delete(key)
        except (OSError, ValueError) as e:
            self.notify(f"couldn't delete it: {e}", severity="error")
        else:
            self.notify("Conversation deleted", timeout=2)
        self._fill()
