"""Pilot tests of the chat app (tui/) on a fixture model: streaming, cancel, edits, storage, errors."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("textual")

from conftest import FIXTURES  # noqa: E402
from hubserver import FakeHub  # noqa: E402

import nanochat_mlx as nc  # noqa: E402
from nanochat_mlx import engine as engine_module  # noqa: E402
from nanochat_mlx.options import LoadOptions  # noqa: E402
from nanochat_mlx.session import Turn  # noqa: E402
from tui import storage  # noqa: E402
from tui.app import NanochatApp  # noqa: E402
from tui.reply import plain_text, sanitize, segments  # noqa: E402
from tui.screens import ChatScreen, ConversationsScreen, ErrorScreen, HelpScreen, SettingsScreen  # noqa: E402
from tui.widgets import AssistantMessage, PromptInput, StatusBar, ToolCallView, UserMessage  # noqa: E402

pytestmark = pytest.mark.anyio

SOURCE = str(FIXTURES / "g9")
SIZE = (100, 32)
MAX_TOKENS = 24


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Saved chats go to a temp XDG_DATA_HOME."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data" / "nanochat-mlx"


@pytest.fixture(scope="module")
def engine() -> nc.Engine:
    model, tokenizer = nc.load(SOURCE, backend="mlx")
    return nc.Engine(model, tokenizer)


def greedy(engine: nc.Engine, *messages: str, max_tokens: int = MAX_TOKENS) -> str:
    """The last reply ChatSession gives to ``messages`` with greedy decoding."""
    session = nc.ChatSession(engine, params=nc.SamplingParams(temperature=0.0, max_tokens=max_tokens))
    for text in messages:
        for _ in session.stream(text):
            pass
    return session.turns[-1].reply


def make_app(source: str = SOURCE, max_tokens: int = MAX_TOKENS) -> NanochatApp:
    params = nc.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return NanochatApp(LoadOptions(source, backend="mlx"), params, show_timing=False)


async def wait_for(pilot, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {condition}")
        await pilot.pause(0.02)


async def ready(pilot) -> ChatScreen:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))
    await pilot.pause()
    return pilot.app.screen


async def send(pilot, text: str) -> None:
    """Type ``text`` into the prompt, press Enter and wait for the reply to finish."""
    chat = pilot.app.screen
    prompt = chat.query_one(PromptInput)
    prompt.load_text(text)
    await pilot.press("enter")
    await pilot.pause()
    await wait_for(pilot, lambda: not chat.generating)
    await pilot.pause()


def last_reply(chat: ChatScreen) -> AssistantMessage:
    return chat.query(AssistantMessage).last()


def saved(data_home: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((data_home / "conversations").glob("*.json"))]


async def test_send_streams_the_greedy_reply(engine, data_home, monkeypatch):
    expected = greedy(engine, "Hello there")
    monkeypatch.setattr("tui.screens.chat.FLUSH_INTERVAL_S", 0.0)  # one update per token
    appended: list[str] = []
    original = AssistantMessage.add

    async def spy(self, pieces, calls):
        appended.append("".join(p.text for p in pieces))
        await original(self, pieces, calls)

    monkeypatch.setattr(AssistantMessage, "add", spy)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await pilot.press(*"Hello there")
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.generating is False and len(chat.session.turns) == 1)
        await pilot.pause()
        view = last_reply(chat)
        assert view.text == expected
        assert chat.session.turns[-1].reply == expected
        assert view.finished and not view.stopped
        assert "<|" not in view.markdown_source
        assert chat.session.turns[-1].parts[0]["type"] != "text" or view.markdown_source.startswith(
            sanitize(chat.session.turns[-1].parts[0]["text"])
        )
        assert len([d for d in appended if d]) > 1, "the reply should arrive in pieces"
        assert chat.query_one(UserMessage).text == "Hello there"
        assert chat.query_one(PromptInput).text == ""
    convs = saved(data_home)
    assert len(convs) == 1 and "".join(p["text"] for p in convs[0]["turns"][0]["parts"]) == expected
    assert app.return_code in (None, 0)


@pytest.fixture
def slow_engine(monkeypatch):
    """Make each generation step take a while, so a test can act mid-reply."""
    original = engine_module.Engine.generate

    def generate(self, *args, **kwargs):
        inner = original(self, *args, **kwargs)
        try:
            for event in inner:
                time.sleep(0.05)
                yield event
        finally:
            inner.close()

    monkeypatch.setattr(engine_module.Engine, "generate", generate)


async def test_keys_work_while_generating_and_esc_cancels(engine, data_home, request):
    full = greedy(engine, "Tell me a story", max_tokens=300)
    request.getfixturevalue("slow_engine")
    app = make_app(max_tokens=300)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await ready(pilot)
        chat.query_one(PromptInput).load_text("Tell me a story")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(last_reply(chat).text) > 0)
        assert chat.generating
        status = chat.query_one(StatusBar)
        await wait_for(pilot, lambda: "generating" in str(status.render()))
        line = str(status.render())  # at 80 columns the state, speed and context come first
        assert "● generating" in line and "tok/s" in line and "ctx " in line and len(line) <= 78
        await pilot.press(*"abc")  # handled by the UI while the model thread generates
        assert chat.query_one(PromptInput).text == "abc"
        assert chat.generating
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert app.screen is chat and chat.generating
        await pilot.press("escape")  # stop the reply
        await wait_for(pilot, lambda: not chat.generating, timeout=5)
        await pilot.pause()
        turn = chat.session.turns[-1]
        view = last_reply(chat)
        assert turn.stopped and view.stopped
        assert 0 < len(turn.reply_tokens) < 300
        assert full.startswith(turn.reply) and view.text == turn.reply
        assert "stopped" in str(view.footer.render())
        assert chat.query_one(PromptInput).text == "abc"  # the draft survives
    convs = saved(data_home)
    assert convs[0]["turns"][0]["stopped"] is True


async def test_clear_regen_undo(engine, data_home):
    first = greedy(engine, "hi")
    second = greedy(engine, "hi", "and again")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await send(pilot, "hi")
        assert last_reply(chat).text == first
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not chat.generating)
        await pilot.pause()
        assert len(chat.query(AssistantMessage)) == 1 and len(chat.session.turns) == 1
        assert last_reply(chat).text == first  # greedy: the same reply again
        await send(pilot, "/regen")
        assert last_reply(chat).text == first and len(chat.query(AssistantMessage)) == 1
        await send(pilot, "and again")
        assert last_reply(chat).text == second and len(chat.session.turns) == 2
        await send(pilot, "/undo")
        assert len(chat.session.turns) == 1 and len(chat.query(AssistantMessage)) == 1
        assert chat.query_one(PromptInput).text == "and again"  # back in the prompt to edit
        assert saved(data_home)[0]["turns"][-1]["user"] == "hi"
        old_id = chat.conversation.id
        chat.query_one(PromptInput).clear()
        await send(pilot, "/clear")
        assert chat.session.turns == [] and not chat.query(AssistantMessage)
        assert chat.query("#welcome") and chat.conversation.id != old_id
        assert len(saved(data_home)) == 1  # the old chat stays saved


async def test_save_then_load(engine, data_home):
    expected = greedy(engine, "remember me")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await send(pilot, "remember me")
        await send(pilot, "/save my chat")
        assert saved(data_home)[0]["title"] == "my chat"
        await send(pilot, "/clear")
        assert not chat.session.turns
        await send(pilot, "/load my chat")
        assert [t.user for t in chat.session.turns] == ["remember me"]
        assert chat.session.turns[0].reply == expected
        assert last_reply(chat).text == expected
        assert chat.conversation.title == "my chat" and chat.sub_title == "my chat"
        # Continuing the reopened chat gives what a session with both turns gives.
        await send(pilot, "more")
        assert last_reply(chat).text == greedy(engine, "remember me", "more")
        # The conversation list reopens chats too.
        await send(pilot, "/clear")
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, ConversationsScreen)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen is chat and len(chat.session.turns) == 2)


async def test_error_screen_for_a_bad_source_then_another_source(tmp_path):
    app = make_app(source=str(tmp_path / "missing"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen))
        screen = app.screen
        assert "no such file or folder" in screen.message and "\n" not in screen.message
        assert "Traceback" not in screen.message and screen.details is None
        source_input = screen.query_one("#error-source")
        source_input.value = SOURCE
        await pilot.press("enter")
        chat = await ready(pilot)
        assert chat.model.generation == "g9"


async def test_error_screen_quit_status(tmp_path):
    (tmp_path / "broken").mkdir()
    app = make_app(source=str(tmp_path / "broken"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen))
        assert app.load_error
        await pilot.press("ctrl+q")
    assert app.return_code == 1


async def test_ctrl_q_quits_with_status_0():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+q")
    assert app.return_code == 0


async def test_slash_commands_change_settings(data_home):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await send(pilot, "/temp 0.7")
        await send(pilot, "/topk 5")
        await send(pilot, "/system Be brief.")
        assert chat.session.params.temperature == 0.7 and chat.session.params.top_k == 5
        assert chat.session.system_prompt == "Be brief."
        await send(pilot, "/topk off")
        assert chat.session.params.top_k is None
        await send(pilot, "/temp hot")  # a mistake is a notification, not a crash
        await send(pilot, "/nonsense")
        assert chat.session.params.temperature == 0.7
        messages = [n.message for n in app._notifications]
        assert any("/temp needs a number" in m for m in messages)
        assert any("unknown command /nonsense" in m for m in messages)
        await send(pilot, "/help")
        assert isinstance(app.screen, HelpScreen)


async def test_settings_screen_applies(data_home):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await pilot.press("f2")
        await pilot.pause()
        settings = app.screen
        assert isinstance(settings, SettingsScreen)
        settings.query_one("#set-temperature").value = "0.3"
        settings.query_one("#set-top-k").value = ""
        settings.query_one("#set-max-tokens").value = "12"
        settings.query_one("#set-system").load_text("You are terse.")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen is chat
        p = chat.session.params
        assert (p.temperature, p.top_k, p.max_tokens) == (0.3, None, 12)
        assert chat.session.system_prompt == "You are terse."
        await pilot.press("f2")
        await pilot.pause()
        app.screen.query_one("#set-top-p").value = "2"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)  # a bad value keeps the dialog open
        assert "top-p" in str(app.screen.query_one("#settings-error").render())


async def test_input_history_copy_and_export(engine, data_home):
    expected = greedy(engine, "first message")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await send(pilot, "first message")
        prompt = chat.query_one(PromptInput)
        prompt.load_text("draft")
        await pilot.press("up")
        assert prompt.text == "first message"
        await pilot.press("down")
        assert prompt.text == "draft"
        prompt.clear()
        await pilot.press("shift+enter")
        await pilot.press("ctrl+j")
        assert prompt.text == "\n\n"  # new lines, nothing sent
        assert len(chat.session.turns) == 1
        prompt.clear()
        await pilot.press("alt+c")
        assert app.clipboard == plain_text(chat.session.turns[-1].parts) and expected.startswith(app.clipboard[:1])


CODE_REPLY = [
    {"type": "text", "text": "Here you go:\n\n```python\nprint('hi')\n```\n\nThe sum is "},
    {"type": "python", "text": "2+2"},
    {"type": "python_output", "text": "4"},
    {"type": "text", "text": ", so **4**."},
]


async def test_tool_calls_and_code_blocks_render(data_home):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        conv = storage.Conversation(source=SOURCE, generation="g9", turns=[Turn("sum?", CODE_REPLY)])
        await chat.open_conversation(conv)
        await pilot.pause()
        tool = chat.query_one(ToolCallView)
        assert tool.segment.text == "2+2" and tool.segment.result == "4"
        assert "2+2" not in last_reply(chat).markdown_source
        await pilot.press("alt+b")
        assert app.clipboard == "print('hi')\n"
        assert chat.session.context_used() > 10  # the reply was tokenized for this model


def test_segments_from_parts():
    parts = [{"type": "text", "text": "a "}, {"type": "python", "text": "1+2"}, {"type": "python_output", "text": "3"}]
    segs = segments([*parts, {"type": "text", "text": " b"}])
    assert [(s.kind, s.text, s.result, s.state) for s in segs] == [
        ("text", "a ", None, "done"),
        ("tool", "1+2", "3", "done"),
        ("text", " b", None, "done"),
    ]
    assert segments(parts[:2], [], finished=False)[1].state == "typing"
    assert segments(parts[:2], ["3"], finished=False)[1].state == "running"
    assert segments(parts, ["3"], finished=False)[1].state == "output"
    assert segments(parts[:2], [None], finished=False)[1].state == "refused"
    assert segments(parts[:2])[1].state == "refused"  # finished without an output
    assert plain_text(parts) == "a `1+2 = 3`"
    assert sanitize("a\x15b\nc") == "a␕b\nc"


def test_atomic_save_never_loses_the_previous_file(tmp_path, monkeypatch):
    store = storage.ConversationStore(tmp_path / "convs")
    conv = storage.Conversation(title="kept", turns=[Turn("u", [{"type": "text", "text": "r"}])])
    store.save(conv)
    before = store.path(conv.id).read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    conv.turns.append(Turn("u2"))
    with pytest.raises(OSError):
        store.save(conv)
    assert store.path(conv.id).read_text() == before
    assert [p.name for p in (tmp_path / "convs").iterdir()] == [f"{conv.id}.json"]  # no temp files left
    monkeypatch.undo()
    [kept] = store.matches("kept")
    assert [t.reply for t in kept.turns] == ["r"]


def test_data_dir_follows_xdg(data_home):
    assert storage.data_dir() == data_home
    assert storage.ConversationStore().root == data_home / "conversations"


def test_run_tui_signature():
    import inspect

    from tui.app import run_tui

    sig = inspect.signature(run_tui)
    assert list(sig.parameters) == ["options", "params", "system", "debug"]
    assert all(sig.parameters[p].kind is inspect.Parameter.KEYWORD_ONLY for p in ("params", "system", "debug"))


# --- the items: each test names the item it covers ------------------------------------


def notices(app, text: str) -> list[str]:
    return [n.message for n in app._notifications if text in n.message]


async def test_long_chat_keeps_every_turn_and_marks_where_the_model_view_begins(data_home):
    """Item 1: only what is fed to the model is trimmed; the notice appears once."""
    long = "please tell me all about the weather in the mountains today " * 2
    turns = [Turn(f"{i}: {long}", [{"type": "text", "text": "ok"}]) for i in range(12)]
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await chat.open_conversation(storage.Conversation(source=SOURCE, generation="g9", turns=turns))
        await send(pilot, "and now?")
        start = chat.session.context_start
        assert start > 0 and len(chat.session.turns) == 13
        assert len(chat.query(UserMessage)) == 13  # the transcript keeps them all
        children = list(chat.query_one("#transcript").children)
        divider = chat.query_one(".context-start")
        rows = [c for c in children if c.has_class("user-row")]
        assert children.index(divider) == children.index(rows[start]) - 1
        assert len(notices(app, "no longer sees")) == 1
    assert len(saved(data_home)[0]["turns"]) == 13


async def test_stop_and_quit_act_at_once_during_prefill_and_the_message_is_saved_when_sent(data_home, request):
    """Item 3: Ctrl+C (like Esc) stops within about a second in a long prefill; progress shows."""
    request.getfixturevalue("slow_engine")
    message = "count the words in this long message please " * 12
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        chat.model.engine.prefill_chunk = 2  # many prefill chunks, each slowed by slow_engine
        chat.query_one(PromptInput).load_text(message)
        await pilot.press("enter")
        status = chat.query_one(StatusBar)
        await wait_for(pilot, lambda: "reading prompt" in str(status.render()))
        assert "reading prompt" in str(last_reply(chat).footer.render())
        assert [t["user"] for t in saved(data_home)[0]["turns"]] == [message]  # saved before any reply
        began = time.monotonic()
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: not chat.generating, timeout=5)
        assert time.monotonic() - began < 1.5  # about a second, with room for a busy CI machine
        turn = chat.session.turns[-1]
        assert turn.stopped and turn.reply_tokens == []
        assert isinstance(app.screen, ChatScreen)  # Ctrl+C stopped the reply; it didn't offer to quit
        chat.query_one(PromptInput).load_text(message)
        await pilot.press("enter")
        await wait_for(pilot, lambda: "reading prompt" in str(status.render()))
        began = time.monotonic()
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: app.return_code is not None, timeout=5)
        assert time.monotonic() - began < 1.5  # about a second, with room for a busy CI machine
    assert app.return_code == 0
    turns = saved(data_home)[0]["turns"]
    assert [t["user"] for t in turns] == [message, message] and turns[-1]["stopped"] is True


def terminal_run(
    args: list[str], tmp_path: Path, ready_text: bytes, keys: bytes, size=(80, 24), env: dict | None = None
) -> tuple[int, str, float]:
    """Run ``nanochat-mlx tui ARGS`` in a pseudo-terminal; once ``ready_text`` is on screen, type
    ``keys``. Returns the exit status, everything it wrote, and seconds from the keys to the exit."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80x24
    env = {**os.environ, "TERM": "xterm-256color", "XDG_DATA_HOME": str(tmp_path / "data"), "COLUMNS": "", "LINES": "",
           **(env or {})}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanochat_mlx.cli", "tui", *args],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    out, sent_at = b"", None
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if sent_at is None and ready_text in out:
                os.write(master, keys)
                sent_at = time.monotonic()
                deadline = sent_at + 10
            readable, _, _ = select.select([master], [], [], 0.1)
            try:
                chunk = os.read(master, 65536) if readable else b""
            except OSError:  # EIO: every copy of the other end is closed, so the app has exited
                chunk = b""
            out += chunk
            if proc.poll() is not None and not chunk:
                break
        else:
            raise AssertionError(f"the app didn't exit; it wrote: {out[-2000:]!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    assert sent_at is not None, f"never saw {ready_text!r}: {out[-2000:]!r}"
    return proc.returncode, out.decode("utf-8", "replace"), time.monotonic() - sent_at


def test_ctrl_q_quits_at_once_while_a_download_hangs(tmp_path):
    """Item 2: the model thread never holds up quitting (here it waits on a Hub download that never
    finishes); no blank wait, no threading traceback."""
    repo = tmp_path / "remote"
    repo.mkdir()
    for f in (FIXTURES / "g9").iterdir():
        if f.is_file():
            shutil.copy(f, repo)
    shutil.copy(FIXTURES / "g9" / "tokenizer" / "tokenizer.pkl", repo)
    hub = FakeHub(repo, stall="model_000500.pt")
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    try:
        code, out, seconds = terminal_run(
            ["--source", "hf:owner/remote", "--backend", "mlx"], tmp_path, b"Find and read", b"\x11", env=env
        )
    finally:
        hub.shutdown()
    assert any("model_000500.pt" in r for r in hub.requests)  # the download had started
    assert seconds < 3.0
    assert "Traceback" not in out and "Exception" not in out
    assert code == 0


async def test_typing_after_a_click_in_the_transcript_goes_to_the_prompt(data_home):
    """Item 5."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await send(pilot, "hello")
        await pilot.click("#transcript", offset=(5, 2))
        prompt = chat.query_one(PromptInput)
        assert not prompt.has_focus
        await pilot.press(*"hi there")
        assert prompt.text == "hi there" and prompt.has_focus


def fake_clipboard_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str = "xclip") -> Path:
    """A ``name`` on PATH that writes what it gets to a file (as xclip puts it on the clipboard)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "clipboard.txt"
    bin_dir.mkdir()
    (bin_dir / name).write_text(f"#!/bin/sh\ncat > {out}\n")
    (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    return out


async def test_copy_keys_that_ordinary_terminals_send_and_the_system_clipboard(data_home, tmp_path, monkeypatch):
    """Item 6: F3 / F4 copy (Alt+C / Alt+B stay as extras); the text goes to the system clipboard
    through the platform's tool when there is one, and the notification says where it went."""
    clipboard = fake_clipboard_tool(tmp_path, monkeypatch)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        conv = storage.Conversation(source=SOURCE, generation="g9", turns=[Turn("sum?", CODE_REPLY)])
        await chat.open_conversation(conv)
        await pilot.press("f3")
        assert clipboard.read_text() == app.clipboard == plain_text(CODE_REPLY)
        assert notices(app, "Last reply copied to the clipboard (xclip)")
        await pilot.press("f4")
        assert clipboard.read_text() == app.clipboard == "print('hi')\n"
        monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
        monkeypatch.delenv("DISPLAY")
        await pilot.press("alt+c")
        assert app.clipboard == plain_text(CODE_REPLY)
        assert notices(app, "sent to the terminal's clipboard (OSC 52)")


async def save_tuned_chat(pilot) -> None:
    """A chat saved as "tuned" with temperature 0.9 and top-k 7, then a new one started."""
    for text in ("/temp 0.9", "/topk 7", "remember these settings", "/save tuned", "/clear"):
        await send(pilot, text)


async def test_reopened_chat_uses_its_saved_temperature_and_top_k(data_home):
    """Item 10: saved sampling settings come back with the chat."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await save_tuned_chat(pilot)
        await send(pilot, "/temp 0")
        await send(pilot, "/topk off")
        await send(pilot, "/load tuned")
        p = chat.session.params
        assert (p.temperature, p.top_k, p.max_tokens) == (0.9, 7, MAX_TOKENS)


async def test_deleting_a_chat_asks_first(data_home):
    """Item 10: Delete asks; a second Delete deletes, Esc keeps it."""
    store = storage.ConversationStore(data_home / "conversations")
    store.save(storage.Conversation(id="keep-me", title="keep me", turns=[Turn("hi")]))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()
        await pilot.press("delete")
        await pilot.pause()
        assert "Press Delete again" in str(app.screen.query_one("#conversations-hint").render())
        assert store.path("keep-me").exists()
        await pilot.press("escape")  # keep it: the list stays open
        assert isinstance(app.screen, ConversationsScreen) and store.path("keep-me").exists()
        await pilot.press("delete", "delete")
        await pilot.pause()
        assert not store.path("keep-me").exists()


async def test_export_takes_a_path(data_home, tmp_path, monkeypatch):
    """Item 10: /export PATH (a file or a folder); no path: the current folder; the notice names it."""
    monkeypatch.chdir(tmp_path)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "export me")
        await send(pilot, f"/export {tmp_path / 'chat.md'}")
        assert "## You" in (tmp_path / "chat.md").read_text()
        (tmp_path / "out").mkdir()
        await send(pilot, "/export out")
        await send(pilot, "/export")
        inside = list((tmp_path / "out").glob("*.md"))
        here = [p for p in tmp_path.glob("*.md") if p.name != "chat.md"]
        assert len(inside) == 1 and len(here) == 1
        for path in (tmp_path / "chat.md", inside[0], here[0]):
            assert notices(app, f"Exported to {path}")
        await send(pilot, f"/export {tmp_path / 'no' / 'such' / 'x.md'}")
        assert notices(app, "no folder")


HAND_EDITED = {
    "null-updated.json": lambda ok: {**ok, "id": "null-updated", "updated": None},
    "int-turns.json": lambda ok: {**ok, "id": "int-turns", "turns": [1, 2]},
    "int-title.json": lambda ok: {**ok, "id": "int-title", "title": 123},
    "twin.json": lambda ok: ok,  # a second file with the good file's id
    "escape.json": lambda ok: {**ok, "id": "../escape"},
}


async def test_hand_edited_chat_files_are_listed_as_unreadable_and_left_untouched(data_home, tmp_path):
    """Item 10: bad files never crash the list or /load, are never written or deleted, and no path
    outside the chats folder is ever touched."""
    store = storage.ConversationStore(data_home / "conversations")
    good = storage.Conversation(id="good", title="good one", turns=[Turn("hi", [{"type": "text", "text": "yo"}])])
    store.save(good)
    ok = json.loads(store.path("good").read_text())
    for name, edit in HAND_EDITED.items():
        (store.root / name).write_text(json.dumps(edit(ok)))
    (store.root / "truncated.json").write_text(json.dumps(ok)[:40])
    before = {p.name: p.read_bytes() for p in store.root.iterdir()}
    convs, bad = store.scan()
    assert [c.id for c in convs] == ["good"]
    assert sorted(u.path.name for u in bad) == sorted([*HAND_EDITED, "truncated.json"])
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await send(pilot, "/load twin")  # the unreadable twin is not found; nothing crashes
        assert notices(app, "no saved conversation called 'twin'")
        await pilot.press("ctrl+o")
        await pilot.pause()
        table = app.screen.query_one("#conversations-table")
        assert table.row_count == 1 + len(HAND_EDITED) + 1
        for _ in range(table.row_count - 1):  # the good one comes first, then the unreadable files
            await pilot.press("down", "delete", "delete", "enter")  # neither deleted nor opened
            await pilot.pause()
            assert isinstance(app.screen, ConversationsScreen) and table.row_count == 1 + len(HAND_EDITED) + 1
        await pilot.press(*["up"] * table.row_count, "enter")
        await wait_for(pilot, lambda: app.screen is chat)
        assert chat.session.turns[0].user == "hi"  # the good one opens
    after = {p.name: p.read_bytes() for p in store.root.iterdir() if p.name != "good.json"}
    assert after == {k: v for k, v in before.items() if k != "good.json"}
    assert not (data_home / "escape.json").exists() and not (tmp_path / "escape.json").exists()
    for bad_id in ("../escape", "/tmp/x", "..", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            store.path(bad_id)
    with pytest.raises(ValueError):  # a conversation may not replace an unreadable file of its id
        store.save(storage.Conversation(id="int-turns"))
    assert (store.root / "int-turns.json").read_bytes() == before["int-turns.json"]


async def test_backend_tip_when_mlx_runs_on_a_cpu_without_torch(data_home, monkeypatch):
    """Item 7: one line in the welcome card, only where it applies."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        assert "tip:" not in str(chat.query_one("#welcome").render())  # torch is installed here
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch weren't installed
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        welcome = str(chat.query_one("#welcome").render())
        assert welcome.count("tip: MLX runs on the CPU") == 1


async def test_a_message_too_long_for_the_context_is_refused_and_stays_in_the_prompt(data_home):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        text = "far too long for a context of 640 tokens " * 40
        chat.query_one(PromptInput).load_text(text)
        await pilot.press("enter")
        await pilot.pause()
        assert notices(app, "message too long")
        assert chat.session.turns == [] and not chat.generating
        assert chat.query_one(PromptInput).text == text
    assert not (data_home / "conversations").exists()


# --- the QA pass's items ------------------------------------------------------------------------


def shown_text(widget) -> str:
    """What a Static shows, as plain text (Rich markup in it rendered as the screen renders it)."""
    import io

    from rich.console import Console

    console = Console(width=160, file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


async def help_section(pilot, section: str) -> str:
    """The text of one section of the F1 help, opened from a ready chat."""
    await ready(pilot)
    await pilot.press("f1")
    await pilot.pause()
    return shown_text(pilot.app.screen.query_one(f"#{section}"))


async def test_help_lists_only_new_line_keys_the_terminal_tells_from_enter(data_home):
    """QA 1: xterm sends Alt+Enter as ESC CR, which arrives as Enter (it sends): the help doesn't offer it."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        keys = await help_section(pilot, "help-keys")
        assert "Shift+Enter / Ctrl+J " in keys
        assert "Alt+Enter" not in keys


async def test_a_paste_while_the_transcript_has_focus_goes_to_the_prompt(data_home):
    """QA 2: as typed keys do; a paste into the prompt itself arrives once."""
    from textual import events

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await send(pilot, "hello")
        prompt = chat.query_one(PromptInput)
        await pilot.press("tab")
        assert not prompt.has_focus
        app.post_message(events.Paste("pasted\ntext"))  # as the terminal's bracketed paste arrives
        await pilot.pause()
        assert prompt.text == "pasted\ntext" and prompt.has_focus
        app.post_message(events.Paste(" again"))
        await pilot.pause()
        assert prompt.text == "pasted\ntext again"


async def test_opening_a_chat_says_when_its_settings_replace_the_current_ones(data_home):
    """QA 3: the chat keeps its settings; the notice names those that differ from what was set."""
    app = make_app()  # temperature 0, top-k 50, max tokens 24, as if given on the command line
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await save_tuned_chat(pilot)
        await send(pilot, "/temp 0")
        await send(pilot, "/load tuned")
        assert notices(app, "Opened") == ["Opened “tuned” with its settings: temperature 0.9"]  # top-k is 7 already
        assert (chat.session.params.temperature, chat.session.params.top_k) == (0.9, 7)
        await send(pilot, "/clear")
        await send(pilot, "/load tuned")  # the same settings as now: nothing to say about them
        assert notices(app, "Opened “tuned”")[-1] == "Opened “tuned”"


async def test_new_chat_and_regenerate_keys_while_a_reply_streams_say_why_they_wait(data_home, slow_engine):
    """QA 4: Ctrl+N and Ctrl+R warn as /regen and Enter do, and change nothing."""
    app = make_app(max_tokens=300)
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        chat.query_one(PromptInput).load_text("Tell me a story")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(last_reply(chat).text) > 0)
        conv_id = chat.conversation.id
        await pilot.press("ctrl+n")
        await pilot.press("ctrl+r")
        assert len(notices(app, "A reply is still streaming: press Esc to stop it first")) == 2
        assert chat.generating and chat.conversation.id == conv_id and len(chat.query(AssistantMessage)) == 1
        await pilot.press("escape")
        await wait_for(pilot, lambda: not chat.generating, timeout=5)


async def test_the_palettes_screenshot_is_saved_in_the_data_dir_and_the_notice_names_it(data_home):
    """QA 5: Textual's default folder (~/Downloads) may not exist; screenshots/ in the data dir is made."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Screenshot")
        await pilot.pause(0.3)
        await pilot.press("enter")
        folder = data_home / "screenshots"
        await wait_for(pilot, lambda: notices(app, "screenshot"), timeout=10)
        [svg] = list(folder.glob("*.svg"))
        assert "<svg" in svg.read_text()
        [notice] = notices(app, "screenshot")
        assert notice.startswith("Saved screenshot to") and str(svg) in notice


async def settings_error(pilot, **fields: str) -> str:
    """Open F2, type ``fields`` (``top_k="abc"``), press Ctrl+S; the dialog's error line."""
    await pilot.press("f2")
    await pilot.pause()
    dialog = pilot.app.screen
    for name, text in fields.items():
        dialog.query_one(f"#set-{name.replace('_', '-')}").value = text
    await pilot.press("ctrl+s")
    await pilot.pause()
    assert pilot.app.screen is dialog  # a bad value keeps the dialog open
    return str(dialog.query_one("#settings-error").render())


async def test_a_bad_settings_value_is_named_by_its_field_in_plain_words(data_home):
    """QA 6: no Python error text; the cursor goes to the field."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        assert await settings_error(pilot, temperature="") == "Temperature: enter a number"
        assert app.screen.query_one("#set-temperature").has_focus
        await pilot.press("escape")
        assert await settings_error(pilot, top_k="abc") == "Top-k: enter a whole number (0 = off)"
        assert app.screen.query_one("#set-top-k").has_focus
        await pilot.press("escape")
        assert chat.session.params.temperature == 0.0 and chat.session.params.top_k == 50


async def test_max_tokens_below_1_is_refused_in_the_settings(data_home):
    """QA 7: 0 would give an empty reply every time."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        assert await settings_error(pilot, max_tokens="0") == "Max tokens: enter 1 or more (empty = up to the context)"
        assert app.screen.query_one("#set-max-tokens").has_focus
        await pilot.press("escape")
        assert chat.session.params.max_tokens == MAX_TOKENS


async def test_copy_with_an_unknown_argument_is_an_error_and_copies_nothing(data_home):
    """QA 8: /copy foo used to copy the last reply."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        await send(pilot, "/copy foo")
        assert notices(app, "unknown /copy argument 'foo' (try /copy or /copy code)")
        assert not app.clipboard and not notices(app, "copied")


async def test_a_command_that_takes_no_argument_refuses_one(data_home):
    """QA 8: /clear all, /undo 2...: said so, and nothing done (the words may have meant something)."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await send(pilot, "hello")
        await send(pilot, "/undo 2")
        await send(pilot, "/clear all")
        assert notices(app, "/undo takes no argument (got '2')") and notices(app, "/clear takes no argument")
        assert len(chat.session.turns) == 1


async def test_load_with_a_name_several_chats_match_lists_them_to_pick_from(data_home):
    """QA 9: /load PREFIX opened the most recent match; now the list opens with only the matches."""
    store = storage.ConversationStore(data_home / "conversations")
    for conv_id, title in (("a", "weather today"), ("b", "weather tomorrow"), ("c", "sums")):
        store.save(storage.Conversation(id=conv_id, title=title, turns=[Turn(title, [{"type": "text", "text": "ok"}])]))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await send(pilot, "/load weather")
        assert notices(app, "2 saved chats match 'weather': pick one")
        assert isinstance(app.screen, ConversationsScreen) and not chat.session.turns
        table = app.screen.query_one("#conversations-table")
        assert table.row_count == 2
        await pilot.press("down", "enter")  # the older one
        await wait_for(pilot, lambda: app.screen is chat and len(chat.session.turns) == 1)
        assert chat.conversation.title == "weather today"
        await send(pilot, "/load sum")  # one match: opened at once
        assert chat.conversation.title == "sums"


async def test_temp_and_topk_alone_show_the_current_value(data_home):
    """QA 10: they said "/temp needs a number, got ''"."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "/temp")
        await send(pilot, "/topk off")
        await send(pilot, "/topk")
        assert notices(app, "temperature is 0; /temp X sets it")
        assert notices(app, "top-k is off; /topk K sets it (0 or off: no limit)")
        assert not notices(app, "needs a")


async def test_the_notice_for_one_turn_out_of_the_context_says_it_in_the_singular(data_home):
    """QA 10: it said "the first 1 turn (they stay...)"."""
    long = "please tell me all about the weather in the mountains today " * 9  # two of them overflow 640 tokens
    turns = [Turn(long, [{"type": "text", "text": "ok"}]) for _ in range(2)]
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        await chat.open_conversation(storage.Conversation(source=SOURCE, generation="g9", turns=turns))
        await send(pilot, "and now?")
        assert chat.session.context_start == 1
        [notice] = notices(app, "no longer sees")
        assert notice.endswith("it no longer sees the first turn (it stays in the transcript)")


async def test_help_shows_the_commands_arguments_in_brackets(data_home):
    """QA 10: "/save [name]" showed as "/save" (Rich read "[name]" as markup)."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        commands = await help_section(pilot, "help-commands")
        for usage in ("/save [name]", "/load [name]", "/model [source]", "/export [path]", "/copy [code]"):
            assert usage in commands


async def test_a_long_title_in_the_chat_list_is_cut_so_every_column_fits_80_columns(data_home):
    """QA 11: the Model and Updated columns were pushed off-screen."""
    store = storage.ConversationStore(data_home / "conversations")
    title = "a chat about the weather in the mountains, the sea and everything in between " * 2
    store.save(storage.Conversation(id="long", title=title, generation="g9", turns=[Turn("hi")]))
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()
        table = app.screen.query_one("#conversations-table")
        await wait_for(pilot, lambda: table.virtual_size.width <= table.size.width, timeout=5)  # no sideways scroll
        [(shown, turns, model, _)] = [table.get_row_at(0)]
        assert shown.plain.endswith("…") and title.startswith(shown.plain[:-1])
        assert (turns, model) == ("1", "g9")
