"""The chat screen: transcript, prompt, status bar; replies stream from the model thread."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Right, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TextArea

from nanochat_mlx.engine import GenerationEvent, GenerationStats
from nanochat_mlx.errors import NanochatError
from nanochat_mlx.sampling import SamplingParams
from nanochat_mlx.session import ChatSession, Turn

from ..commands import BY_NAME, parse, suggestions
from ..loader import LoadedModel, describe_error, format_count
from ..reply import retokenize, to_markdown
from ..storage import Conversation, ConversationStore, atomic_write_text, exports_dir, slug
from ..widgets import AssistantMessage, PromptInput, StatusBar, UserMessage
from ..widgets.status import Speed
from .conversations import ConversationsScreen
from .settings import Settings, SettingsScreen

if TYPE_CHECKING:
    from collections.abc import Iterator

FLUSH_INTERVAL_S = 1 / 30  # at most this often the model thread sends text to the UI
# Commands that change the conversation and so must wait for the reply in progress.
_EDITS = {"clear", "regen", "undo", "system", "load"}


class ChatScreen(Screen):
    """Talk to the model. Everything that touches the model runs on the app's model thread."""

    BINDINGS = [
        Binding("escape", "stop", "Stop", tooltip="Stop the reply in progress (the partial reply stays)"),
        Binding("ctrl+n", "new_chat", "New chat", tooltip="Start a new chat (the current one stays saved)"),
        Binding("ctrl+r", "regenerate", "Regenerate", tooltip="Regenerate the last reply"),
        Binding("ctrl+o", "conversations", "Chats", tooltip="Reopen a saved chat"),
        Binding("f2", "settings", "Settings", tooltip="Sampling settings and system prompt"),
        Binding("alt+c", "copy_reply", "Copy reply", show=False, tooltip="Copy the last reply"),
        Binding("alt+b", "copy_code", "Copy code", show=False, tooltip="Copy the last code block"),
    ]

    generating: reactive[bool] = reactive(False)

    @dataclass
    class ReplyDelta(Message):
        view: AssistantMessage
        text: str
        speed: Speed

    @dataclass
    class ReplyDone(Message):
        view: AssistantMessage
        error: str | None

    def __init__(
        self,
        model: LoadedModel,
        params: SamplingParams,
        system: str | None,
        store: ConversationStore,
        *,
        show_timing: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.session = ChatSession(model.engine, system_prompt=system, params=params)
        self.store = store
        self.show_timing = show_timing
        self.conversation = self._new_conversation()
        self._cancel = threading.Event()
        self._params_after: SamplingParams | None = None  # restored after a regeneration's new seed
        self._regens = 0

    # --- layout --------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Vertical(id="chat"):
            with VerticalScroll(id="transcript"):
                yield self._welcome()
            yield Static("", id="hint")
            yield PromptInput(
                id="prompt",
                placeholder="Message nanochat…  (Enter send · Shift+Enter new line · /help commands)",
            )
            yield StatusBar(show_timing=self.show_timing, id="status")
        yield Footer()

    def _welcome(self) -> Static:
        m = self.model
        text = Text()
        text.append(f"◆ {m.name}", "bold").append(f"   generation {m.generation}\n", "bold")
        text.append(f"{format_count(m.n_params)} parameters · {m.backend} · {m.precision} · ")
        text.append(f"context {m.engine.context_limit} tokens")
        text.append(f" · loaded in {m.seconds:.1f} s\n" if self.show_timing else "\n")
        text.append(f"generation detected from: {m.checkpoint.how}\n", "dim")
        for note in m.checkpoint.notes:
            text.append(f"note: {note}\n", "italic")
        text.append("\nType a message and press Enter.\n")
        text.append("Shift+Enter or Ctrl+J: new line · ↑/↓: earlier messages · Esc: stop a reply\n", "dim")
        text.append("/help: commands · F1: every key · Ctrl+P: command palette and themes", "dim")
        welcome = Static(text, id="welcome")
        welcome.border_title = "nanochat-mlx"
        return welcome

    def on_mount(self) -> None:
        status = self.query_one(StatusBar)
        status.set_model(self.model.name, self.model.generation, self.model.backend, self.model.precision)
        status.set_speed(None)
        status.set_state(False)
        self._update_context()
        self.query_one("#transcript", VerticalScroll).anchor()
        prompt = self.query_one(PromptInput)
        prompt.cursor_blink = self.show_timing
        prompt.focus()
        self._update_title()

    def _update_title(self) -> None:
        self.title = "nanochat-mlx"
        self.sub_title = self.conversation.display_title

    def _update_context(self) -> None:
        self.query_one(StatusBar).set_context(self.session.context_used(), self.model.engine.context_limit)

    def watch_generating(self, generating: bool) -> None:
        if self.is_mounted:
            self.query_one(StatusBar).set_state(generating)
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.generating
        if action in ("regenerate", "new_chat"):
            return None if self.generating else True
        return True

    # --- input ---------------------------------------------------------------------------------
    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        if not isinstance(event.text_area, PromptInput):
            return
        hint = self.query_one("#hint", Static)
        matches = suggestions(event.text_area.text)
        hint.display = bool(matches)
        if matches:
            line = Text()
            for c in matches:
                line.append(f" /{c.name}", "bold").append(f" {c.args}" if c.args else "", "italic")
                line.append(f"  {c.help}   ", "dim")
            hint.update(line)

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        command = parse(text)
        if self.generating and (command is None or command[0] in _EDITS):
            self.notify("A reply is still streaming: press Esc to stop it first", severity="warning", timeout=3)
            return
        event.prompt.clear()
        event.prompt.remember(text)
        if command is not None:
            await self.run_command(*command)
        else:
            await self.send(text[1:] if text.startswith("//") else text)

    async def send(self, text: str) -> None:
        """Send a user message and stream the reply."""
        await self._hide_welcome()
        transcript = self.query_one("#transcript", VerticalScroll)
        view = AssistantMessage(label=self._label())
        await transcript.mount_all([Right(UserMessage(text)), view])
        self._start(self.session.stream(text), view)

    def _label(self) -> str:
        return f"nanochat · {self.model.generation}"

    async def _hide_welcome(self) -> None:
        for welcome in self.query("#welcome"):
            await welcome.remove()

    # --- generation ----------------------------------------------------------------------------
    def _start(self, events: Iterator[GenerationEvent], view: AssistantMessage) -> None:
        self._cancel.clear()
        self.generating = True
        self.query_one(StatusBar).set_speed(Speed())
        self._reply_worker(events, view)

    @work(exclusive=True, group="reply")
    async def _reply_worker(self, events: Iterator[GenerationEvent], view: AssistantMessage) -> None:
        await self.app.model_thread.run(self._drive, events, view)

    def _drive(self, events: Iterator[GenerationEvent], view: AssistantMessage) -> None:
        """On the model thread: pull events, batch text, post it; stop at once when cancelled."""
        runner = self.model.engine.runner
        start = time.perf_counter()
        first_at: float | None = None
        tokens = 0
        pending: list[str] = []
        last_flush = 0.0
        error: str | None = None

        def flush(now: float) -> None:
            nonlocal pending, last_flush
            tps = (tokens - 1) / (now - first_at) if first_at is not None and tokens > 1 and now > first_at else 0.0
            ttft = first_at - start if first_at is not None else None
            speed = Speed(tokens, tps, ttft, runner.peak_memory())
            self.post_message(self.ReplyDelta(view, "".join(pending), speed))
            pending, last_flush = [], now

        try:
            for event in events:
                if self._cancel.is_set():
                    break
                now = time.perf_counter()
                if event.stats is None:
                    tokens += 1
                    first_at = first_at or now
                pending.append(event.text)
                if event.tool_calls or event.stats is not None or now - last_flush >= FLUSH_INTERVAL_S:
                    flush(now)
        except Exception as exc:  # shown as one line; the app never shows a traceback
            error = describe_error(exc)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # cancels generation in the engine
        if pending:
            flush(time.perf_counter())
        self.post_message(self.ReplyDone(view, error))

    async def on_chat_screen_reply_delta(self, message: ReplyDelta) -> None:
        await message.view.append(message.text)
        status = self.query_one(StatusBar)
        status.set_speed(message.speed)
        self._update_context()

    async def on_chat_screen_reply_done(self, message: ReplyDone) -> None:
        turn = self.session.turns[-1] if self.session.turns else None
        self.generating = False
        if self._params_after is not None:
            self.session.params, self._params_after = self._params_after, None
        if message.error or turn is None or turn.reply != message.view.text:
            if message.error:
                self.notify(message.error, title="Generation failed", severity="error", timeout=8)
            await self.render_transcript()
        else:
            await message.view.finish(stopped=turn.stopped, footer=self._footer(turn.stats))
            if turn.stats is not None:
                s = turn.stats
                speed = Speed(s.generated_tokens, s.decode_tps, s.ttft_s, s.peak_memory_bytes)
                self.query_one(StatusBar).set_speed(speed)
        if self.session.notices:
            for notice in self.session.notices:
                self.notify(notice, severity="warning", timeout=6)
            self.session.notices.clear()
            await self.render_transcript()
        self._update_context()
        self.save()

    def _footer(self, stats: GenerationStats | None) -> str:
        if stats is None:
            return ""
        parts = [f"{stats.generated_tokens} tokens"]
        if self.show_timing:
            parts += [f"{stats.decode_tps:.1f} tok/s", f"ttft {stats.ttft_s * 1000:.0f} ms"]
        if stats.stopped == "max_tokens":
            parts.append("max tokens reached")
        elif stats.stopped == "context":
            parts.append("context full")
        return " · ".join(parts)

    def action_stop(self) -> None:
        """Esc: stop the reply; the model thread sees the flag before its next token."""
        if self.generating:
            self._cancel.set()

    def cancel_generation(self) -> None:
        self._cancel.set()

    # --- conversation edits ----------------------------------------------------------------------
    async def action_new_chat(self) -> None:
        if self.generating:
            return
        self.session.clear()
        self.conversation = self._new_conversation()
        await self.render_transcript()
        self.notify("New chat", timeout=2)

    async def action_regenerate(self) -> None:
        if self.generating:
            return
        if not self.session.turns:
            self.notify("Nothing to regenerate yet", severity="warning", timeout=3)
            return
        views = self.query(AssistantMessage)
        if views:
            await views.last().remove()
        params = self.session.params
        if params.seed is not None and not params.greedy:  # a new seed, or it would repeat itself
            self._regens += 1
            self._params_after = params
            self.session.params = params.with_(seed=params.seed + self._regens)
        view = AssistantMessage(label=self._label())
        await self.query_one("#transcript", VerticalScroll).mount(view)
        self._start(self.session.regenerate(), view)

    async def undo(self) -> None:
        turn = self.session.undo()
        if turn is None:
            self.notify("Nothing to undo", severity="warning", timeout=3)
            return
        await self.render_transcript()
        prompt = self.query_one(PromptInput)
        if not prompt.text:
            prompt.load_text(turn.user)
            prompt.move_cursor(prompt.document.end)
        if self.session.turns:
            self.save()
        else:
            self.store.delete(self.conversation.id)

    async def render_transcript(self) -> None:
        """Rebuild the transcript from the session's turns."""
        transcript = self.query_one("#transcript", VerticalScroll)
        await transcript.remove_children()
        widgets = []
        for turn in self.session.turns:
            widgets.append(Right(UserMessage(turn.user)))
            widgets.append(
                AssistantMessage(turn.reply, label=self._label(), stopped=turn.stopped, footer=self._footer(turn.stats))
            )
        await transcript.mount_all(widgets or [self._welcome()])
        transcript.scroll_end(animate=False)
        self._update_context()
        self._update_title()

    # --- persistence ---------------------------------------------------------------------------
    def _new_conversation(self) -> Conversation:
        return Conversation(source=self.model.options.source, generation=self.model.generation)

    def save(self, title: str | None = None) -> bool:
        """Write the conversation (atomically) to the store."""
        conv = self.conversation
        if title:
            conv.title = title
        conv.system = self.session.system_prompt
        conv.params = self.session.params.to_dict()
        conv.turns = [
            {**t.to_dict(), "stats": asdict(t.stats) if t.stats is not None else None} for t in self.session.turns
        ]
        try:
            self.store.save(conv)
        except (OSError, ValueError) as e:
            self.notify(f"couldn't save the conversation: {e}", severity="error")
            return False
        self._update_title()
        return True

    async def open_conversation(self, conv: Conversation, announce: bool = True) -> None:
        """Make ``conv`` the current chat."""
        tokenizer = self.model.engine.tokenizer
        same_model = conv.source == self.model.options.source
        turns = []
        for data in conv.turns:
            turn = Turn.from_dict(data)
            if not same_model or not turn.reply_tokens:
                turn.reply_tokens = retokenize(tokenizer, turn.reply)
            try:
                turn.stats = GenerationStats(**data["stats"]) if data.get("stats") else None
            except TypeError:
                turn.stats = None
            turns.append(turn)
        self.session.clear()
        self.session.load_turns(turns)
        self.session.set_system(conv.system)
        self.conversation = conv
        await self.render_transcript()
        if announce:
            self.notify(f"Opened “{conv.display_title}”", timeout=2)

    # --- commands ------------------------------------------------------------------------------
    async def run_command(self, name: str, arg: str) -> None:
        """Run a slash command; mistakes are reported in a notification."""
        if name not in BY_NAME:
            self.notify(f"unknown command /{name} (try /help)", severity="error", timeout=4)
            return
        try:
            await getattr(self, f"_cmd_{name}")(arg)
        except NanochatError as e:
            self.notify(str(e), severity="error", timeout=5)

    async def _cmd_clear(self, arg: str) -> None:
        await self.action_new_chat()

    async def _cmd_regen(self, arg: str) -> None:
        await self.action_regenerate()

    async def _cmd_undo(self, arg: str) -> None:
        await self.undo()

    async def _cmd_system(self, arg: str) -> None:
        self.session.set_system(arg or None)
        self.notify(f"System prompt set: {arg}" if arg else "System prompt cleared", timeout=3)
        self._update_context()
        if self.session.turns:
            self.save()

    async def _cmd_temp(self, arg: str) -> None:
        try:
            value = float(arg)
        except ValueError:
            raise NanochatError(f"/temp needs a number, got {arg!r}") from None
        self.session.params = self.session.params.with_(temperature=value)
        self.notify(f"temperature {value:g}" + (" (greedy)" if value == 0 else ""), timeout=2)

    async def _cmd_topk(self, arg: str) -> None:
        if arg.lower() in ("off", "none", "0"):
            value = None
        else:
            try:
                value = int(arg)
            except ValueError:
                raise NanochatError(f"/topk needs a whole number or 'off', got {arg!r}") from None
        self.session.params = self.session.params.with_(top_k=value)
        self.notify(f"top-k {value if value is not None else 'off'}", timeout=2)

    async def _cmd_save(self, arg: str) -> None:
        if not self.session.turns:
            raise NanochatError("nothing to save yet")
        if self.save(title=arg or None):
            self.notify(f"Saved “{self.conversation.display_title}”", timeout=3)

    async def _cmd_load(self, arg: str) -> None:
        if not arg:
            self.action_conversations()
            return
        conv = self.store.find(arg)
        if conv is None:
            raise NanochatError(f"no saved conversation called {arg!r} (/load alone lists them)")
        await self.open_conversation(conv)

    async def _cmd_export(self, arg: str) -> None:
        if not self.session.turns:
            raise NanochatError("nothing to export yet")
        conv = self.conversation
        turns = [t.to_dict() for t in self.session.turns]
        model = f"{self.model.name} ({self.model.generation})"
        text = to_markdown(conv.display_title, model, self.session.system_prompt, turns)
        path = exports_dir() / f"{slug(conv.display_title)}-{conv.id}.md"
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise NanochatError(f"couldn't write {path}: {e}") from None
        self.notify(f"Exported to {path}", timeout=6)

    async def _cmd_copy(self, arg: str) -> None:
        if arg.lower() == "code":
            self.action_copy_code()
        else:
            self.action_copy_reply()

    async def _cmd_settings(self, arg: str) -> None:
        self.action_settings()

    async def _cmd_help(self, arg: str) -> None:
        self.app.action_help()

    # --- other actions -------------------------------------------------------------------------
    def action_copy_reply(self) -> None:
        views = self.query(AssistantMessage)
        if not views or not views.last().text:
            self.notify("No reply to copy yet", severity="warning", timeout=2)
            return
        self.app.copy_to_clipboard(views.last().plain_text())
        self.notify("Last reply copied to the clipboard", timeout=2)

    def action_copy_code(self) -> None:
        for view in reversed(list(self.query(AssistantMessage))):
            blocks = view.code_blocks()
            if blocks:
                self.app.copy_to_clipboard(blocks[-1])
                self.notify("Code block copied to the clipboard", timeout=2)
                return
        self.notify("No code block in the replies yet", severity="warning", timeout=2)

    def action_settings(self) -> None:
        def apply(settings: Settings | None) -> None:
            if settings is None:
                return
            changed_system = settings.system != self.session.system_prompt
            self.session.params = settings.params
            self.session.set_system(settings.system)
            self._update_context()
            if changed_system and self.session.turns:
                self.save()
            self.notify("Settings saved", timeout=2)

        self.app.push_screen(SettingsScreen(self.session.params, self.session.system_prompt), apply)

    def action_conversations(self) -> None:
        async def open_id(conv_id: str | None) -> None:
            if conv_id is None or conv_id == self.conversation.id:
                return
            if self.generating:
                self.notify("A reply is still streaming: press Esc to stop it first", severity="warning")
                return
            try:
                conv = self.store.load(conv_id)
            except (OSError, ValueError, TypeError) as e:
                self.notify(f"couldn't open that conversation: {e}", severity="error")
                return
            await self.open_conversation(conv)

        self.app.push_screen(ConversationsScreen(self.store, current=self.conversation.id), open_id)
