"""Help: every key binding and slash command."""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from ..commands import COMMANDS


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, expand=True)
    table.add_column("Key" if title == "Keys" else "Command", style="bold", no_wrap=True)
    table.add_column("What it does", ratio=1)
    for key, what in rows:
        table.add_row(Text(key), Text(what))  # plain text: Rich would read "/save [name]" as markup and drop "[name]"
    return table


class HelpScreen(ModalScreen[None]):
    """A scrollable list of keys and commands; Esc, F1 or q closes it."""

    BINDINGS = [Binding("escape,f1,q", "app.pop_screen", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        with Vertical(id="help-card", classes="dialog"):
            yield Label("Help", classes="dialog-title")
            with VerticalScroll(id="help-scroll"):
                yield Static(_table("Keys", self.keys), id="help-keys")
                commands = [(f"/{c.name} {c.args}".strip(), c.help) for c in COMMANDS]
                commands.append(("//text", "send a message that starts with /"))
                yield Static(_table("Slash commands", commands), id="help-commands")
            yield Label("Esc close", classes="dialog-hint")
