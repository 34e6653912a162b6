"""SVG snapshots of the chat app (pytest-textual-snapshot) at 80x24 and 120x40: every screen."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pytest_textual_snapshot")

from conftest import FIXTURES  # noqa: E402

from nanochat_mlx import SamplingParams  # noqa: E402
from nanochat_mlx.options import LoadOptions  # noqa: E402
from nanochat_mlx.session import Turn  # noqa: E402
from tui.app import NanochatApp  # noqa: E402
from tui.screens import ChatScreen, ErrorScreen  # noqa: E402
from tui.storage import Conversation  # noqa: E402

SOURCE = str(FIXTURES / "g9")

REPLY = [
    {
        "type": "text",
        "text": """Sure! Here is a small Python function that greets someone:

```python
def greet(name: str) -> str:
    return f"Hello, {name}!"
```

Call it with `greet("Ada")`. And the sum you asked for: """,
    },
    {"type": "python", "text": "21+21"},
    {"type": "python_output", "text": "42"},
    {"type": "text", "text": " so the answer is **42**."},
]

CONVERSATION = Conversation(
    id="snapshot",
    title="Greeting and a sum",
    source=SOURCE,
    generation="g9",
    turns=[
        Turn("Write a greet function in Python, and what is 21+21?", REPLY),
        Turn("Thanks! One more thing…", [{"type": "text", "text": "Of course, happy to help"}], stopped=True),
    ],
)


@pytest.fixture(autouse=True)
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("TZ", "UTC")  # the chat list shows local times
    time.tzset()
    yield tmp_path / "data"
    monkeypatch.undo()
    time.tzset()


def make_app(source: str = SOURCE) -> NanochatApp:
    params = SamplingParams(temperature=0.0, max_tokens=16)
    return NanochatApp(LoadOptions(source, backend="mlx"), params, show_timing=False)


async def until(pilot, condition) -> None:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < 30, "timed out"
        await pilot.pause(0.02)
    await pilot.pause()


async def chat_ready(pilot) -> ChatScreen:
    await until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))
    return pilot.app.screen


SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])


@SIZES
def test_main_screen(snap_compare, size):
    async def run_before(pilot) -> None:
        chat = await chat_ready(pilot)
        await chat.open_conversation(CONVERSATION, announce=False)
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


@SIZES
def test_long_chat_marks_where_the_model_view_begins(snap_compare, size):
    """The transcript keeps every turn; a line marks the first one the model still sees."""
    long = "please tell me all about the weather in the mountains today " * 2
    turns = [Turn(f"{i}: {long}", [{"type": "text", "text": "ok"}]) for i in range(12)]

    async def run_before(pilot) -> None:
        chat = await chat_ready(pilot)
        await chat.open_conversation(Conversation(id="long", source=SOURCE, turns=turns), announce=False)
        chat.query_one("#prompt").load_text("and now?")
        await pilot.press("enter")

        def replied() -> bool:
            replies = chat.query("AssistantMessage")
            return len(replies) == 13 and replies.last().finished and not chat.generating

        await until(pilot, replied)
        chat.query_one(".context-start").scroll_visible(animate=False, top=True)
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


@SIZES
def test_welcome_screen(snap_compare, size):
    async def run_before(pilot) -> None:
        await chat_ready(pilot)

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


@SIZES
def test_settings_screen(snap_compare, size):
    async def run_before(pilot) -> None:
        await chat_ready(pilot)
        await pilot.press("f2")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


@SIZES
def test_help_screen(snap_compare, size):
    async def run_before(pilot) -> None:
        await chat_ready(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


@SIZES
def test_conversations_screen(snap_compare, size):
    async def run_before(pilot) -> None:
        chat = await chat_ready(pilot)
        root = chat.store.root
        root.mkdir(parents=True)
        saved = {**CONVERSATION.to_dict(), "created": 1.7e9, "updated": 1.7e9}  # 2023-11-14 22:13 UTC
        (root / "snapshot.json").write_text(json.dumps(saved))
        (root / "hand-edited.json").write_text('{"version": 2, "id": "hand-edited", "turns": [1, 2]}')
        await pilot.press("ctrl+o")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


@SIZES
def test_error_screen(snap_compare, size):
    async def run_before(pilot) -> None:
        await until(pilot, lambda: isinstance(pilot.app.screen, ErrorScreen))

    assert snap_compare(make_app("no/such/model"), terminal_size=size, run_before=run_before)
