"""The chat screen: transcript, prompt, status bar; replies stream from the model thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Right, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static, TextArea

from nanochat_mlx.backends import backend_hint
from nanochat_mlx.engine import GenerationEvent, GenerationStats, Piece, ToolCall
from nanochat_mlx.errors import NanochatError
from nanochat_mlx.loading import LoadedModel
from nanochat_mlx.sampling import SamplingParams
from nanochat_mlx.session import ChatSession, Turn

from ..commands import BY_NAME, parse, suggestions
from ..loader import describe_error, format_count
from ..reply import to_markdown
from ..storage import Conversation, ConversationStore, atomic_write_text, slug
from ..widgets import AssistantMessage, PromptInput, StatusBar, UserMessage
from .conversations import ConversationsScreen
from .settings import Settings, SettingsScreen, differences

if TYPE_CHECKING:
    from collections.abc import Iterator

FLUSH_INTERVAL_S = 1 / 30  # at most this often the model thread sends text to the UI
# Commands that change the conversation and so must wait for the reply in progress.
_EDITS = {"clear", "regen", "undo", "system", "load", "model"}
STILL_STREAMING = "A reply is still streaming: press Esc to stop it first"
CONTEXT_START = "▲ the model no longer sees the turns above (they stay in the saved chat)"


class ChatScreen(Screen):
    """Talk to the model. Everything that touches the model runs on the app's model thread."""

    BINDINGS = [
        Binding("escape", "stop", "Stop", tooltip="Stop the reply in progress (the partial reply stays)"),
        Binding("ctrl+c", "stop", "Stop", show=False, priority=True, tooltip="Stop the reply; else copy the selection"),
        Binding("ctrl+n", "new_chat", "New", tooltip="Start a new chat (the current one stays saved)"),
        Binding("ctrl+r", "regenerate", "Regen", tooltip="Regenerate the last reply"),
        Binding("ctrl+o", "conversations", "Chats", tooltip="Reopen or delete a saved chat"),
        Binding("ctrl+l,f5", "models", "Models", show=False, tooltip="Switch to another model (the chat stays open)"),
        Binding("f2", "settings", "Settings", tooltip="Sampling settings and system prompt"),
        Binding("f3,alt+c", "copy_reply", "Copy", tooltip="Copy the last reply"),
        Binding("f4,alt+b", "copy_code", "Copy code", show=False, tooltip="Copy the last code block"),
    ]

    generating: reactive[bool] = reactive(False)

    @dataclass
    class ReplyDelta(Message):
        view: AssistantMessage
        pieces: list[Piece]
        calls: list[ToolCall]
        notices: list[str]
        stats: GenerationStats | None = None

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
        self.default_params = params
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
            yield PromptInput(id="prompt", placeholder="Message nanochat…  (Enter send · /help commands)")
            yield StatusBar(show_timing=self.show_timing, id="status")
        yield Footer()

    def _welcome(self) -> Static:
        m = self.model
        text = Text()
        text.append(f"◆ {m.name} · generation {m.generation}\n", "bold")
        text.append(f"{format_count(m.n_params)} parameters · {m.backend} · {m.device} · {m.precision} · ")
        text.append(f"context {m.context_limit} tokens")
        text.append(f" · loaded in {m.seconds:.1f} s\n" if self.show_timing else "\n")
        text.append(f"generation detected from: {m.checkpoint.how}\n", "dim")
        for note in m.checkpoint.notes:
            text.append(f"note: {note}\n", "italic")
        if hint := backend_hint(m.backend, m.device):
            text.append(f"tip: {hint}\n", "italic")
        text.append("\nType a message and press Enter.\n")
        text.append("Shift+Enter or Ctrl+J: new line · ↑/↓: earlier messages · Esc or Ctrl+C: stop\n", "dim")
        text.append("/help: commands · F1: every key · Ctrl+P: command palette", "dim")
        welcome = Static(text, id="welcome")
        welcome.border_title = "nanochat-mlx"
        return welcome

    def on_mount(self) -> None:
        status = self.query_one(StatusBar)
        m = self.model
        status.set_model(m.name, m.generation, f"{m.backend} · {m.device}", m.precision)
        status.set_stats(None)
        status.set_state("")
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
        self.query_one(StatusBar).set_context(self.session.context_used(), self.model.context_limit)

    def watch_generating(self, generating: bool) -> None:
        if self.is_mounted:
            self.query_one(StatusBar).set_state("● generating" if generating else "")
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.generating  # Ctrl+C copies (the prompt's or the screen's selection) otherwise
        return True  # Ctrl+N / Ctrl+R while a reply streams run, to say why they can't (a disabled key is silent)

    # --- input ---------------------------------------------------------------------------------
    def on_key(self, event: events.Key) -> None:
        """A printable key that reached the screen (the transcript had focus, after a click): type it."""
        if event.is_printable and event.character and not isinstance(self.focused, (Input, TextArea)):
            event.stop()
            prompt = self.query_one(PromptInput)
            prompt.focus()
            prompt.insert(event.character)

    def on_paste(self, event: events.Paste) -> None:
        """A paste that reached the screen (the transcript had focus): it goes to the prompt, as typing does."""
        # A paste into the prompt bubbles up here too, already inserted: only take those nobody took.
        if not isinstance(self.focused, (Input, TextArea)):
            event.stop()
            prompt = self.query_one(PromptInput)
            prompt.focus()
            prompt.insert(event.text)

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
        if (command is None or command[0] in _EDITS) and self.still_streaming():
            return
        if command is not None:
            event.prompt.clear()
            event.prompt.remember(text)
            await self.run_command(*command)
            return
        try:
            await self.send(text[1:] if text.startswith("//") else text)
        except NanochatError as e:  # empty, or too long for the context: the text stays in the prompt
            self.notify(str(e), severity="error", timeout=6)
            return
        event.prompt.clear()
        event.prompt.remember(text)

    async def send(self, text: str) -> None:
        """Send a user message (saved at once) and stream the reply."""
        events_ = self.session.stream(text)  # raises before anything changes when it can't be sent
        self.save(stopping=True)  # until its reply ends, the file holds the turn as cut short
        await self._hide_welcome()
        transcript = self.query_one("#transcript", VerticalScroll)
        view = AssistantMessage(label=self._label())
        await transcript.mount_all([self._user_row(text), view])
        await self._mark_context_start()
        self._start(events_, view)

    def _label(self) -> str:
        return f"nanochat · {self.model.generation}"

    @staticmethod
    def _user_row(text: str) -> Right:
        return Right(UserMessage(text), classes="user-row")

    async def _hide_welcome(self) -> None:
        for welcome in self.query("#welcome"):
            await welcome.remove()

    async def _mark_context_start(self) -> None:
        """A line above the first turn the model still sees (none while it sees them all)."""
        await self.query(".context-start").remove()
        start = self.session.context_start
        rows = self.query(".user-row")
        if 0 < start < len(rows):
            divider = Static(CONTEXT_START, classes="context-start")
            await self.query_one("#transcript").mount(divider, before=rows[start])

    # --- generation ----------------------------------------------------------------------------
    def _start(self, events_: Iterator[GenerationEvent], view: AssistantMessage) -> None:
        self._cancel.clear()
        self.generating = True
        self.query_one(StatusBar).set_stats(None)
        self._reply_worker(events_, view)

    @work(exclusive=True, group="reply")
    async def _reply_worker(self, events_: Iterator[GenerationEvent], view: AssistantMessage) -> None:
        await self.app.model_thread.run(self._drive, events_, view)

    def _drive(self, events_: Iterator[GenerationEvent], view: AssistantMessage) -> None:
        """On the model thread: pull events, batch them, post them; stop at the next event when cancelled."""
        delta = self.ReplyDelta(view, [], [], [])
        last_flush = 0.0
        error: str | None = None

        def flush(now: float) -> None:
            nonlocal delta, last_flush
            self._post(delta)
            delta, last_flush = self.ReplyDelta(view, [], [], []), now

        try:
            for event in events_:
                if self._cancel.is_set():
                    break
                delta.pieces += [p for p in event.pieces if p.row == 0]
                delta.calls += event.tool_calls
                delta.notices += event.notices
                delta.stats = event.stats
                now = time.perf_counter()
                urgent = not event.tokens or event.tool_calls or event.notices or event.final
                if urgent or now - last_flush >= FLUSH_INTERVAL_S:
                    flush(now)
        except Exception as exc:  # shown as one line; the app never shows a traceback
            error = describe_error(exc)
        finally:
            events_.close()  # stops the engine now; the session marks the turn stopped
        if delta.pieces or delta.calls or delta.notices:
            flush(time.perf_counter())
        self._post(self.ReplyDone(view, error))

    def _post(self, message: Message) -> None:
        try:
            self.post_message(message)
        except RuntimeError:  # the app has quit and its event loop is closed
            pass

    async def on_chat_screen_reply_delta(self, message: ReplyDelta) -> None:
        for notice in message.notices:
            self.notify(notice, severity="warning", timeout=8)
        await message.view.add(message.pieces, message.calls)
        stats = message.stats
        if stats is not None and self.generating and not self._cancel.is_set():
            status = self.query_one(StatusBar)
            status.set_stats(stats)
            if stats.generated_tokens == 0 and stats.prefill_tokens:
                reading = f"reading prompt {stats.prefilled}/{stats.prefill_tokens}"
                status.set_state(reading)
                message.view.waiting(f"▍ {reading}…")
            else:
                status.set_state("● generating")
        self._update_context()

    async def on_chat_screen_reply_done(self, message: ReplyDone) -> None:
        turn = self.session.turns[-1] if self.session.turns else None
        self.generating = False
        if self._params_after is not None:
            self.session.params, self._params_after = self._params_after, None
        if message.error:
            self.notify(message.error, title="Generation failed", severity="error", timeout=8)
        if turn is not None:
            await message.view.finish(turn.parts, stopped=turn.stopped, footer=self._footer(turn.stats))
            self.query_one(StatusBar).set_stats(turn.stats)
        self._update_context()
        self.save()

    def _footer(self, stats: GenerationStats | None) -> str:
        if stats is None:
            return ""
        parts = [f"{stats.generated_tokens} tokens"]
        if self.show_timing and stats.generated_tokens:
            parts += [f"{stats.decode_tps:.1f} tok/s", f"ttft {stats.ttft_s * 1000:.0f} ms"]
        if stats.stopped == "max_tokens":
            parts.append("max tokens reached")
        elif stats.stopped == "context":
            parts.append("context full")
        return " · ".join(parts)

    def action_stop(self) -> None:
        """Esc or Ctrl+C: stop the reply; the model thread sees the flag at its next event (prefill included)."""
        if self.generating:
            self._cancel.set()
            self.query_one(StatusBar).set_state("■ stopping…")

    def cancel_generation(self) -> None:
        """Quitting: stop the reply and save what there is (its user message is already saved)."""
        if self.generating:
            self._cancel.set()
            self.save(stopping=True)

    # --- conversation edits ----------------------------------------------------------------------
    def still_streaming(self) -> bool:
        """True, with a warning, while a reply streams: what changes the conversation waits for it."""
        if self.generating:
            self.notify(STILL_STREAMING, severity="warning", timeout=3)
        return self.generating

    async def action_new_chat(self) -> None:
        if self.still_streaming():
            return
        self.session.clear()
        self.conversation = self._new_conversation()
        await self.render_transcript()
        self.notify("New chat", timeout=2)

    async def action_regenerate(self) -> None:
        if self.still_streaming():
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
        events_ = self.session.regenerate()
        view = AssistantMessage(label=self._label())
        await self.query_one("#transcript", VerticalScroll).mount(view)
        await self._mark_context_start()
        self._start(events_, view)

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
            try:
                self.store.delete(self.conversation.id)
            except (OSError, ValueError) as e:
                self.notify(f"couldn't delete the saved chat: {e}", severity="error")

    async def render_transcript(self) -> None:
        """Rebuild the transcript from the session's turns."""
        transcript = self.query_one("#transcript", VerticalScroll)
        await transcript.remove_children()
        widgets = []
        for turn in self.session.turns:
            widgets.append(self._user_row(turn.user))
            footer = self._footer(turn.stats)
            widgets.append(AssistantMessage(turn.parts, label=self._label(), stopped=turn.stopped, footer=footer))
        await transcript.mount_all(widgets or [self._welcome()])
        await self._mark_context_start()
        transcript.scroll_end(animate=False)
        self._update_context()
        self._update_title()

    async def use_model(self, model: LoadedModel) -> None:
        """Chat on with ``model``: the transcript stays, its turns re-tokenized for the new tokenizer."""
        old, turns = self.model, list(self.session.turns)
        session = ChatSession(model.engine, system_prompt=self.session.system_prompt, params=self.session.params)
        if model.source != old.source:
            for turn in turns:
                session.retokenize(turn)
        session.load_turns(turns)
        self.model, self.session = model, session
        self.conversation.source, self.conversation.generation = model.source, model.generation
        m = model
        self.query_one(StatusBar).set_model(m.name, m.generation, f"{m.backend} · {m.device}", m.precision)
        await self.render_transcript()
        if turns:
            self.save()

    # --- persistence ---------------------------------------------------------------------------
    def _new_conversation(self) -> Conversation:
        return Conversation(source=self.model.source, generation=self.model.generation)

    def save(self, title: str | None = None, *, stopping: bool = False) -> bool:
        """Write the conversation (atomically) to the store; ``stopping``: the last reply is cut short."""
        conv = self.conversation
        if title:
            conv.title = title
        conv.system = self.session.system_prompt
        conv.params = self.session.params.to_dict()
        conv.turns = list(self.session.turns)
        if stopping and conv.turns:
            last = conv.turns[-1]
            conv.turns[-1] = Turn(last.user, list(last.parts), list(last.reply_tokens), True, last.stats)
        try:
            self.store.save(conv)
        except (OSError, ValueError) as e:
            self.notify(f"couldn't save the conversation: {e}", severity="error")
            return False
        self._update_title()
        return True

    async def open_conversation(self, conv: Conversation, announce: bool = True) -> None:
        """Make ``conv`` the current chat, with its system prompt and sampling settings."""
        vocab = self.model.tokenizer.vocab_size
        for turn in conv.turns:
            foreign = conv.source != self.model.source or any(not 0 <= t < vocab for t in turn.reply_tokens)
            if foreign or not turn.reply_tokens:
                self.session.retokenize(turn)
        self.session.clear()
        self.session.load_turns(conv.turns)
        self.session.set_system(conv.system)
        before, self.session.params = self.session.params, conv.sampling(self.default_params)
        self.conversation = conv
        await self.render_transcript()
        if announce:
            # The chat's settings belong to it, but they replace what the user set (-t, /temp...): say so.
            changed = differences(before, self.session.params)
            if changed:
                self.notify(f"Opened “{conv.display_title}” with its settings: {changed}", timeout=6)
            else:
                self.notify(f"Opened “{conv.display_title}”", timeout=2)

    # --- commands ------------------------------------------------------------------------------
    async def run_command(self, name: str, arg: str) -> None:
        """Run a slash command; mistakes are reported in a notification."""
        if name not in BY_NAME:
            self.notify(f"unknown command /{name} (try /help)", severity="error", timeout=4)
            return
        if arg and not BY_NAME[name].args:  # "/clear all" might mean something else: do nothing
            self.notify(f"/{name} takes no argument (got {arg!r})", severity="error", timeout=4)
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
        if not arg:
            self.notify(f"temperature is {self.session.params.temperature:g}; /temp X sets it", timeout=4)
            return
        try:
            value = float(arg)
        except ValueError:
            raise NanochatError(f"/temp needs a number, got {arg!r}") from None
        self.session.params = self.session.params.with_(temperature=value)
        self.notify(f"temperature {value:g}" + (" (greedy)" if value == 0 else ""), timeout=2)

    async def _cmd_topk(self, arg: str) -> None:
        if not arg:
            top_k = self.session.params.top_k
            self.notify(
                f"top-k is {'off' if top_k is None else top_k}; /topk K sets it (0 or off: no limit)", timeout=4
            )
            return
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
            self.notify(f"Saved “{self.conversation.display_title}” in {self.store.root}", timeout=5)

    async def _cmd_load(self, arg: str) -> None:
        if not arg:
            self.action_conversations()
            return
        found = self.store.matches(arg)
        if not found:
            raise NanochatError(f"no saved conversation called {arg!r} (/load alone lists them)")
        if len(found) > 1:  # opening the most recent could be the wrong one: let the user pick
            self.notify(f"{len(found)} saved chats match {arg!r}: pick one", timeout=5)
            self.action_conversations(match=arg)
            return
        await self.open_conversation(found[0])

    async def _cmd_export(self, arg: str) -> None:
        """``/export [PATH]``: the chat as Markdown in PATH (a file, or a folder), else the current folder."""
        if not self.session.turns:
            raise NanochatError("nothing to export yet")
        conv = self.conversation
        model = f"{self.model.name} ({self.model.generation})"
        text = to_markdown(conv.display_title, model, self.session.system_prompt, self.session.turns)
        path = Path(arg).expanduser() if arg else Path.cwd()
        if path.is_dir():
            path = path / f"{slug(conv.display_title)}-{conv.id}.md"
        path = path.absolute()
        if not path.parent.is_dir():
            raise NanochatError(f"can't export to {path}: no folder {path.parent}")
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise NanochatError(f"couldn't write {path}: {e.strerror or e}") from None
        self.notify(f"Exported to {path}", title="Export", timeout=15)

    async def _cmd_model(self, arg: str) -> None:
        if arg:
            self.app.switch_model(arg)
        else:
            self.action_models()

    async def _cmd_copy(self, arg: str) -> None:
        if arg.lower() == "code":
            self.action_copy_code()
        elif arg:
            raise NanochatError(f"unknown /copy argument {arg!r} (try /copy or /copy code)")
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
        self.app.copy_out(views.last().plain_text(), "Last reply")

    def action_copy_code(self) -> None:
        for view in reversed(list(self.query(AssistantMessage))):
            blocks = view.code_blocks()
            if blocks:
                self.app.copy_out(blocks[-1], "Code block")
                return
        self.notify("No code block in the replies yet", severity="warning", timeout=2)

    def action_models(self) -> None:
        self.app.open_models()

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

    def action_conversations(self, match: str | None = None) -> None:
        async def open_id(conv_id: str | None) -> None:
            if conv_id is None or conv_id == self.conversation.id:
                return
            if self.still_streaming():
                return
            try:
                conv = self.store.load(conv_id)
            except (OSError, ValueError) as e:
                self.notify(f"couldn't open that conversation: {e}", severity="error")
                return
            await self.open_conversation(conv)

        self.app.push_screen(ConversationsScreen(self.store, current=self.conversation.id, match=match), open_id)
