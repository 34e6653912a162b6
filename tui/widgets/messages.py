"""Transcript bubbles: the user's message, and the assistant's streamed Markdown reply with tool calls."""

from __future__ import annotations

from markdown_it import MarkdownIt
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownFence, MarkdownStream

from ..reply import Segment, plain_reply, sanitize, split_reply


class UserMessage(Static):
    """What the user sent (shown verbatim, never as markup)."""

    def __init__(self, text: str) -> None:
        super().__init__(Text(sanitize(text)), markup=False)
        self.text = text
        self.border_title = "You"


class ToolCallView(Static):
    """One calculator call inside a reply: the expression and what the tool answered."""

    def __init__(self, segment: Segment) -> None:
        super().__init__()
        self.segment = segment
        self.show(segment)

    def show(self, segment: Segment) -> None:
        self.segment = segment
        line = Text.assemble((" calculator ", "bold reverse"), "  ", (sanitize(segment.text), "bold"))
        if segment.state == "typing":
            line.append("▍")
        elif segment.state == "running":
            line.append("  = …", "dim")
        elif segment.state == "refused":
            line.append("  no result (not something the calculator evaluates)", "italic dim")
        else:
            line.append("  =  ").append(sanitize(segment.result or ""), "bold")
        self.set_class(segment.state == "refused", "-refused")
        self.update(line)


class AssistantMessage(Vertical):
    """A reply: Markdown segments streamed as tokens arrive, tool calls in between, a footer line."""

    def __init__(self, text: str = "", *, label: str = "nanochat", stopped: bool = False, footer: str = "") -> None:
        super().__init__()
        self.text = text
        self.border_title = label
        self._initial = (text, stopped, footer)
        self._parts: list[tuple[Markdown | ToolCallView, Segment]] = []
        self._stream: MarkdownStream | None = None
        self.finished = False
        self.stopped = stopped

    def compose(self) -> ComposeResult:
        yield Static("", classes="reply-footer")

    async def on_mount(self) -> None:
        text, stopped, footer = self._initial
        if text or footer or stopped:
            self.text = ""
            await self._sync(text, live=False)
            await self.finish(stopped=stopped, footer=footer)
        else:
            self.add_class("-waiting")
            self.query_one(".reply-footer", Static).update("▍ thinking…")

    @property
    def footer(self) -> Static:
        return self.query_one(".reply-footer", Static)

    @property
    def markdown_source(self) -> str:
        """The Markdown the widgets hold (the reply without tool calls)."""
        return "".join(w.source for w, _ in self._parts if isinstance(w, Markdown))

    async def append(self, delta: str) -> None:
        """Add streamed text; Markdown renders progressively through a MarkdownStream."""
        if delta:
            if self.has_class("-waiting"):
                self.remove_class("-waiting")
                self.footer.update("")
            await self._sync(self.text + delta, live=True)

    async def _sync(self, text: str, live: bool, finished: bool = False) -> None:
        self.text = text
        segments = split_reply(text, finished=finished)
        for index, seg in enumerate(segments):
            if index < len(self._parts):
                widget, old = self._parts[index]
                if isinstance(widget, Markdown):
                    new, before = sanitize(seg.text), sanitize(old.text)
                    if new != before:
                        if self._stream is not None and new.startswith(before):
                            await self._stream.write(new[len(before) :])
                        else:
                            await widget.update(new)
                else:
                    widget.show(seg)
                self._parts[index] = (widget, seg)
                continue
            await self._close_stream()
            if seg.kind == "text":
                widget = Markdown("" if live else sanitize(seg.text))
                await self.mount(widget, before=self.footer)
                if live:
                    self._stream = Markdown.get_stream(widget)
                    await self._stream.write(sanitize(seg.text))
            else:
                widget = ToolCallView(seg)
                await self.mount(widget, before=self.footer)
            self._parts.append((widget, seg))

    async def _close_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.stop()

    async def finish(self, *, stopped: bool = False, footer: str = "") -> None:
        """The reply is complete (or was stopped): flush the stream and write the footer."""
        await self._close_stream()
        await self._sync(self.text, live=False, finished=True)
        self.finished = True
        self.stopped = stopped
        self.remove_class("-waiting")
        self.set_class(stopped, "-stopped")
        parts = ["■ stopped"] if stopped else []
        if footer:
            parts.append(footer)
        self.footer.update(Text("  ·  ".join(parts)))
        self.footer.display = bool(parts)

    def plain_text(self) -> str:
        return plain_reply(self.text)

    def code_blocks(self) -> list[str]:
        """The fenced code blocks of the reply, in order."""
        tokens = MarkdownIt("gfm-like").parse(self.markdown_source)
        return [t.content for t in tokens if t.type in ("fence", "code_block")]

    def on_click(self, event: events.Click) -> None:
        """Clicking a code block copies it."""
        node = event.widget
        while node is not None and node is not self:
            if isinstance(node, MarkdownFence):
                self.app.copy_to_clipboard(node.code)
                self.app.notify("Code block copied to the clipboard", timeout=2)
                event.stop()
                return
            node = node.parent
