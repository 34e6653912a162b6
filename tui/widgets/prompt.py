"""The prompt: a multi-line TextArea where Enter sends and Up/Down walk the input history."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = ("shift+enter", "ctrl+j")  # the ones the help lists
# Alt+Enter arrives as a key of its own only from terminals that speak the kitty keyboard protocol;
# xterm and most others send ESC CR, which Textual reads as Enter. So it works where it can, unlisted.
UNLISTED_NEWLINE_KEYS = ("alt+enter",)


class PromptInput(TextArea):
    """Enter sends; Shift+Enter or Ctrl+J adds a line; Up on the first line / Down on the last walk history."""

    @dataclass
    class Submitted(Message):
        prompt: PromptInput
        text: str

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("soft_wrap", True)
        kwargs.setdefault("show_line_numbers", False)
        kwargs.setdefault("tab_behavior", "focus")
        kwargs.setdefault("compact", True)
        super().__init__(**kwargs)
        self.sent: list[str] = []
        self._history_pos: int | None = None  # index into history while browsing
        self._draft = ""

    def remember(self, text: str) -> None:
        if text and (not self.sent or self.sent[-1] != text):
            self.sent.append(text)
        self._history_pos = None

    async def _on_key(self, event: events.Key) -> None:
        key = event.key
        if key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.post_message(self.Submitted(self, text))
            return
        if key in NEWLINE_KEYS or key in UNLISTED_NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            start, end = self.selection
            self._replace_via_keyboard("\n", start, end)
            return
        if key == "up" and self.cursor_location[0] == 0 and self._browse(-1):
            event.stop()
            event.prevent_default()
            return
        if key == "down" and self.cursor_location[0] == self.document.line_count - 1 and self._browse(1):
            event.stop()
            event.prevent_default()
            return
        await super()._on_key(event)

    def _browse(self, step: int) -> bool:
        """Show the previous (-1) or next (+1) history entry; False when there is none."""
        if not self.sent:
            return False
        if self._history_pos is None:
            if step > 0:
                return False
            self._draft = self.text
            pos = len(self.sent) - 1
        else:
            pos = self._history_pos + step
            if pos < 0:
                return True  # already at the oldest: swallow the key
        if pos >= len(self.sent):
            self._history_pos = None
            self._set(self._draft)
            return True
        self._history_pos = pos
        self._set(self.sent[pos])
        return True

    def _set(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)
