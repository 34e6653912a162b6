"""Transcript bubbles: the user's message, and the assistant's streamed Markdown reply with tool calls."""

from __future__ import annotations

from markdown_it import MarkdownIt
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownFence, MarkdownStream

from nanochat_mlx.engine import Piece, ToolCall
from nanochat_mlx.session import Turn

from ..reply import Segment, plain_text, sanitize, segments


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
    """A reply: Markdown segments streamed as pieces arrive, tool calls in between, a footer line."""

    def __init__(
        self, parts: list[dict] | None = None, *, label: str = "nanochat", stopped: bool = False, footer: str = ""
    ) -> None:
        super().__init__()
        self.reply = Turn("", [dict(p) for p in parts or []])  # the parts shown (Turn.add merges pieces)
        self.results: list[str | None] = []  # the calculator's answers so far, while streaming
        self.border_title = label
        self._initial = (parts is not None, stopped, footer)
        self._widgets: list[tuple[Markdown | ToolCallView, Segment]] = []
        self._stream: MarkdownStream | None = None
        self.finished = False
        self.stopped = stopped

    def compose(self) -> ComposeResult:
        yield Static("", classes="reply-footer")

    async def on_mount(self) -> None:
        done, stopped, footer = self._initial
        if done:
            await self.finish(stopped=stopped, footer=footer)
        else:
            self.waiting("▍ thinking…")

    @property
    def text(self) -> str:
        """The reply as plain joined text (``Turn.reply``)."""
        return self.reply.reply

    @property
    def footer(self) -> Static:
        return self.query_one(".reply-footer", Static)

    @property
    def markdown_source(self) -> str:
        """The Markdown the widgets hold (the reply without tool calls)."""
        return "".join(w.source for w, _ in self._widgets if isinstance(w, Markdown))

    def waiting(self, note: str) -> None:
        """No text yet: say what the model is doing (thinking, reading the prompt)."""
        self.add_class("-waiting")
        self.footer.update(note)

    async def add(self, pieces: list[Piece], calls: list[ToolCall]) -> None:
        """Add streamed pieces and tool calls; Markdown renders progressively through a MarkdownStream."""
        for piece in pieces:
            self.reply.add(piece)
        self.results += [c.result for c in calls]
        if self.reply.parts and self.has_class("-waiting"):
            self.remove_class("-waiting")
            self.footer.update("")
        await self._sync(live=True)

    async def _sync(self, live: bool, finished: bool = False) -> None:
        for index, seg in enumerate(segments(self.reply.parts, self.results, finished)):
            if index < len(self._widgets):
                widget, old = self._widgets[index]
                if isinstance(widget, Markdown):
                    new, before = sanitize(seg.text), sanitize(old.text)
                    if new != before:
                        if self._stream is not None and new.startswith(before):
                            await self._stream.write(new[len(before) :])
                        else:
                            await widget.update(new)
                else:
                    widget.show(seg)
                self._widgets[index] = (widget, seg)
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
            self._widgets.append((widget, seg))

    async def _close_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.stop()

    async def finish(self, parts: list[dict] | None = None, *, stopped: bool = False, footer: str = "") -> None:
        """The reply is complete (or was stopped): show ``parts`` (the session's), write the footer."""
        if parts is not None:
            self.reply = Turn("", [dict(p) for p in parts])
        await self._close_stream()
        await self._sync(live=False, finished=True)
        self.finished = True
        self.stopped = stopped
        self.remove_class("-waiting")
        self.set_class(stopped, "-stopped")
        notes = ["■ stopped"] if stopped else []
        if footer:
            notes.append(footer)
        self.footer.update(Text("  ·  ".join(notes)))
        self.footer.display = bool(notes)

    def plain_text(self) -> str:
        return plain_text(self.reply.parts)

    def code_blocks(self) -> list[str]:
        """The fenced code blocks of the reply, in order."""
        tokens = MarkdownIt("gfm-like").parse(self.markdown_source)
        return [t.content for t in tokens if t.type in ("fence", "code_block")]

    def on_click(self, event: events.Click) -> None:
        """Clicking a code block copies it."""
        node = event.widget
        while node is not None and node is not self:
            if isinstance(node, MarkdownFence):
                self.app.copy_out(node.code, "Code block")
                event.stop()
                return
            node = node.parent
