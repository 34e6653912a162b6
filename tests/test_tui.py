"""Pilot tests of the chat app (tui/) on a fixture model: streaming, cancel, edits, storage, errors."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("textual")

from conftest import FIXTURES  # noqa: E402

import nanochat_mlx as nc  # noqa: E402
from nanochat_mlx import engine as engine_module  # noqa: E402
from nanochat_mlx.options import LoadOptions  # noqa: E402
from nanochat_mlx.session import Turn  # noqa: E402
from tui import storage  # noqa: E402
from tui.app import NanochatApp  # noqa: E402
from tui.reply import plain_text, sanitize, segments  # noqa: E402
from tui.screens import ChatScreen, ConversationsScreen, ErrorScreen, HelpScreen, SettingsScreen  # noqa: E402
from tui.widgets import AssistantMessage, PromptInput, ToolCallView, UserMessage  # noqa: E402

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
    async with app.run_test(size=SIZE) as pilot:
        chat = await ready(pilot)
        chat.query_one(PromptInput).load_text("Tell me a story")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(last_reply(chat).text) > 0)
        assert chat.generating
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
    assert [t.reply for t in store.find("kept").turns] == ["r"]


def test_data_dir_follows_xdg(data_home):
    assert storage.data_dir() == data_home
    assert storage.ConversationStore().root == data_home / "conversations"


def test_run_tui_signature():
    import inspect

    from tui.app import run_tui

    sig = inspect.signature(run_tui)
    assert list(sig.parameters) == ["options", "params", "system", "debug"]
    assert all(sig.parameters[p].kind is inspect.Parameter.KEYWORD_ONLY for p in ("params", "system", "debug"))
