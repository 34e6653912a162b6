"""The Textual app: load a model (loading / error screens), then chat. Entry point: :func:`run_tui`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from nanochat_mlx.backends import pick_backend
from nanochat_mlx.demo import SOURCE as DEMO_SOURCE
from nanochat_mlx.errors import NanochatError
from nanochat_mlx.loading import LoadedModel, Progress, from_checkpoint, load_model
from nanochat_mlx.options import LoadOptions
from nanochat_mlx.sampling import SamplingParams
from nanochat_mlx.userconfig import remember_source

from .clipboard import copy_to_system
from .loader import ModelThread, describe_error, format_traceback, on_daemon_thread, read_for_switch
from .screens import ChatScreen, ErrorScreen, HelpScreen, LoadingScreen, ModelsScreen
from .storage import ConversationStore, data_dir
from .widgets.prompt import NEWLINE_KEYS


def key_label(keys: str) -> str:
    """``"ctrl+n,f2"`` as ``"Ctrl+N / F2"``."""
    names = {"escape": "Esc", "enter": "Enter", "delete": "Delete", "up": "↑", "down": "↓", "tab": "Tab"}

    def one(key: str) -> str:
        parts = key.split("+")
        return "+".join(names.get(p, p.upper() if len(p) == 1 or p[0] == "f" else p.capitalize()) for p in parts)

    return " / ".join(one(k.strip()) for k in keys.split(","))


def stage_reporter(screen: LoadingScreen) -> Callable[[Progress], None]:
    """A load-progress callback (any thread) that shows each stage on ``screen``."""

    def stage(progress: Progress) -> None:
        try:
            screen.post_message(LoadingScreen.Stage(progress))
        except RuntimeError:  # the app has quit and its event loop is closed
            pass

    return stage


class NanochatApp(App[int]):
    """Chat with a nanochat model in the terminal."""

    CSS_PATH = "app.tcss"
    VERTICAL_BREAKPOINTS = [(0, "-short"), (32, "-tall")]  # screens get the class; app.tcss compacts -short
    TITLE = "nanochat-mlx"
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True, tooltip="Quit (the chat is already saved)"),
        Binding("f1", "help", "Help", tooltip="Show every key and command"),
    ]

    def __init__(
        self,
        options: LoadOptions,
        params: SamplingParams | None = None,
        system: str | None = None,
        *,
        debug: bool = False,
        show_timing: bool = True,
        store: ConversationStore | None = None,
    ) -> None:
        super().__init__()
        self.options = options
        self.params = params or SamplingParams()
        self.system = system
        self.show_tracebacks = debug
        self.show_timing = show_timing
        self.store = store or ConversationStore()
        self.model_thread = ModelThread()
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self.theme = "tokyo-night"

    # --- loading -------------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.load(self.options.source)

    def load(self, source: str) -> None:
        """Show the loading screen and load ``source`` (errors lead to the error screen)."""
        self.options = self.options.with_source(source)
        try:
            backend = pick_backend(self.options.backend)
        except NanochatError:
            backend = self.options.backend
        screen = LoadingScreen(source, backend)
        if isinstance(self.screen, (LoadingScreen, ErrorScreen, ChatScreen)):
            self.switch_screen(screen)
        else:
            self.push_screen(screen)
        self._load_worker(self.options, screen)

    @work(exclusive=True, group="load")
    async def _load_worker(self, options: LoadOptions, screen: LoadingScreen) -> None:
        stage = stage_reporter(screen)
        try:
            model = await self.model_thread.run(load_model, options, stage)
        except Exception as exc:  # every failure becomes the error screen, never a traceback
            self.load_error = describe_error(exc)
            details = format_traceback(exc) if self.show_tracebacks else None
            await self.switch_screen(ErrorScreen(self.load_error, options.source, details))
            return
        self.model, self.load_error = model, None
        chat = ChatScreen(model, self.params, self.system, self.store, show_timing=self.show_timing)
        await self.switch_screen(chat)

    # --- switching models ------------------------------------------------------------------------
    def open_models(self) -> None:
        """The model picker; the model picked is loaded beside the open one, which the chat keeps until it works."""
        source = self.options.source
        local = source != DEMO_SOURCE and not source.startswith(("hf:", "nanochat:")) and os.path.exists(source)
        self.push_screen(ModelsScreen(source, (source,) if local else ()), self._picked)

    def _picked(self, source: str | None) -> None:
        if source is not None:
            self.switch_model(source)

    def switch_model(self, source: str) -> None:
        """Load ``source`` and chat on with it; failing or cancelled, the open chat keeps its model."""
        chat = next((s for s in self.screen_stack if isinstance(s, ChatScreen)), None)
        if chat is None:  # no model yet (the error screen): a plain load
            self.load(source)
            return
        if chat.still_streaming():
            return
        options = self.options.with_source(source)
        screen = LoadingScreen(source, options.backend, cancellable=True)
        self.push_screen(screen)
        self._switch_worker(options, screen, chat)

    @work(exclusive=True, group="load")
    async def _switch_worker(self, options: LoadOptions, screen: LoadingScreen, chat: ChatScreen) -> None:
        stage = stage_reporter(screen)
        try:
            # The download runs on a thread of its own: cancelling stops waiting for it at once, and a
            # stalled one never blocks the model thread the open chat generates on.
            ckpt = await on_daemon_thread(read_for_switch, options, stage, screen.cancelled)
            if screen.cancelled.is_set():
                return
            model = await self.model_thread.run(from_checkpoint, ckpt, options, stage)
        except Exception as exc:  # the chat goes on with the model it has; the failure is one line
            if not screen.cancelled.is_set():
                await self._close(screen)
                self.notify(describe_error(exc), title=f"Couldn't load {options.source}", severity="error", timeout=10)
            return
        if screen.cancelled.is_set():
            return
        await chat.use_model(model)
        self.model, self.options = model, options
        remember_source(options.source)
        await self._close(screen)
        self.notify(f"Now chatting with {model.name} ({model.generation})", timeout=4)

    async def _close(self, screen: Screen) -> None:
        """Take ``screen`` off the stack, with any dialog opened over it (help, say)."""
        while screen in self.screen_stack:
            await self.pop_screen()

    # --- actions -------------------------------------------------------------------------------
    async def action_quit(self) -> None:
        """Ctrl+Q: stop any reply, save, and leave at once (status 0; 1 when no model could be loaded)."""
        for screen in self.screen_stack:
            if isinstance(screen, ChatScreen):
                screen.cancel_generation()
        code = 1 if isinstance(self.screen, ErrorScreen) else 0
        self.exit(code, return_code=code)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.help_keys()))

    def help_keys(self) -> list[tuple[str, str]]:
        """Every key the app answers to, with what it does."""
        rows = [
            ("Enter", "Send the message (or run a /command)"),
            (key_label(",".join(NEWLINE_KEYS)), "New line in the message (Ctrl+J works in every terminal)"),
            ("↑ / ↓", "Earlier / later messages you sent (on the first / last line of the prompt)"),
        ]
        for binding in ChatScreen.BINDINGS:
            rows.append((key_label(binding.key), binding.tooltip or binding.description))
        rows += [
            ("Click a code block", "Copy that code block"),
            (key_label(self.COMMAND_PALETTE_BINDING), "Command palette: every command, themes, screenshots"),
            ("Tab / Shift+Tab", "Move focus"),
        ]
        for binding in self.BINDINGS:
            rows.append((key_label(binding.key), binding.tooltip or binding.description))
        rows += [
            ("F2 → Ctrl+S / Esc", "In settings: save / cancel"),
            ("Ctrl+O → Enter / Delete", "In the chat list: open / delete (Delete twice: it asks first)"),
            ("Ctrl+L → Enter / Esc", "In the model picker: load / close; Esc while it loads: cancel"),
        ]
        return rows

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if isinstance(screen, ChatScreen):
            chat = screen
            export = lambda: chat.run_command("export", "")  # noqa: E731
            yield SystemCommand("New chat", "Start a new chat (the current one stays saved)", chat.action_new_chat)
            yield SystemCommand("Regenerate", "Regenerate the last reply", chat.action_regenerate)
            yield SystemCommand("Undo", "Remove the last message and its reply", chat.undo)
            yield SystemCommand("Settings", "Sampling parameters and the system prompt", chat.action_settings)
            yield SystemCommand("Conversations", "Reopen a saved chat", chat.action_conversations)
            yield SystemCommand("Switch model", "Pick another model; the chat stays open", self.open_models)
            yield SystemCommand("Export as Markdown", "Write the chat to a Markdown file", export)
            yield SystemCommand("Copy last reply", "Copy the last reply to the clipboard", chat.action_copy_reply)
            yield SystemCommand("Copy last code block", "Copy it to the clipboard", chat.action_copy_code)
        yield SystemCommand("Help", "Every key and slash command", self.action_help)

    def copy_out(self, text: str, what: str) -> None:
        """Copy ``text`` to the system clipboard (pbcopy, wl-copy, xclip, xsel) and the terminal's (OSC 52)."""
        self.copy_to_clipboard(text)
        tool = copy_to_system(text)
        if tool:
            self.notify(f"{what} copied to the clipboard ({tool})", timeout=3)
        else:
            self.notify(
                f"{what} sent to the terminal's clipboard (OSC 52). No clipboard tool found here "
                "(pbcopy, wl-copy, xclip, xsel): if nothing arrives, /export PATH writes the chat to a file",
                timeout=8,
            )

    def deliver_screenshot(
        self, filename: str | None = None, path: str | None = None, time_format: str | None = None
    ) -> str | None:
        """The palette's "Screenshot": an SVG in the user data dir's ``screenshots/`` (Textual's default,
        ~/Downloads, often doesn't exist); the notice names the file."""
        if path is None:
            folder = data_dir() / "screenshots"
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self.notify(f"couldn't make {folder}: {e.strerror or e}", title="Screenshot", severity="error")
                return None
            path = str(folder)
        return super().deliver_screenshot(filename, path, time_format)

    def on_unmount(self) -> None:
        self.model_thread.shutdown()


EXIT_GRACE_S = 0.5  # how long quitting waits for the model thread to notice a stop


def run_tui(options: LoadOptions, *, params: SamplingParams, system: str | None = None, debug: bool = False) -> int:
    """Run the chat app until the user quits; the exit status (0, or 1 when no model could be loaded)."""
    app = NanochatApp(options, params, system, debug=debug)
    try:
        app.run()
    except KeyboardInterrupt:
        code = 130
    else:
        if app.load_error and app.model is None:
            print(f"error: {app.load_error}", file=sys.stderr)
        code = app.return_code or 0
    if not app.model_thread.wait_idle(EXIT_GRACE_S):
        # A call that can't be interrupted (a download retrying, a forward pass) still runs on the model
        # thread; interpreter shutdown would wait on it or abort in native code, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
