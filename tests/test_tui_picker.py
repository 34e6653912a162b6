"""Pilot tests of the model picker (Ctrl+L, /model): what it lists, switching mid-chat, downloads, cancel."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("textual")

from conftest import FIXTURES  # noqa: E402
from hubserver import FakeHub  # noqa: E402
from test_sources import build_hf_cache  # noqa: E402
from test_tui import ready as chat_ready  # noqa: E402
from test_tui import wait_for  # noqa: E402
from textual.widgets import Input, OptionList, ProgressBar  # noqa: E402

import nanochat_mlx as nc  # noqa: E402
from nanochat_mlx.options import LoadOptions  # noqa: E402
from nanochat_mlx.userconfig import last_source  # noqa: E402
from tui.app import NanochatApp  # noqa: E402
from tui.screens import ChatScreen, LoadingScreen, ModelsScreen  # noqa: E402
from tui.widgets import AssistantMessage, PromptInput, UserMessage  # noqa: E402

pytestmark = pytest.mark.anyio

SOURCE = str(FIXTURES / "g9")
CACHED = "hf:owner/name"  # of its checkpoints d12 and d20 it runs d20, the g2 fixture (another tokenizer than g9's)
PARAMS = nc.SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Saved chats in a temp folder; a Hugging Face cache with owner/name; a base dir with sft/d4 (= g9)."""
    import huggingface_hub.constants

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    hub = tmp_path / "hf" / "hub"
    build_hf_cache(hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = tmp_path / "nanochat"
    shutil.copytree(FIXTURES / "g9", base / "chatsft_checkpoints" / "d4", ignore=shutil.ignore_patterns("expected"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return tmp_path


def make_app(source: str = SOURCE) -> NanochatApp:
    return NanochatApp(LoadOptions(source, backend="mlx"), PARAMS, show_timing=False)


async def send(pilot, chat: ChatScreen, text: str) -> None:
    chat.query_one(PromptInput).load_text(text)
    await pilot.press("enter")
    await pilot.pause()
    await wait_for(pilot, lambda: not chat.generating)
    await pilot.pause()


async def pick(pilot, source: str) -> None:
    """Ctrl+L, then type ``source`` in the picker's source field and press Enter."""
    await pilot.press("ctrl+l")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ModelsScreen))
    pilot.app.screen.query_one(Input).value = source
    pilot.app.screen.query_one(Input).focus()
    await pilot.press("enter")
    await pilot.pause()


def rows(screen: ModelsScreen) -> dict[str, str]:
    menu = screen.query_one(OptionList)
    return {option.id: str(option.prompt) for option in menu.options}


async def test_the_picker_lists_the_demo_cache_base_dir_and_downloads_with_sizes_the_current_one_marked():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await chat_ready(pilot)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        listed = rows(app.screen)
        assert app.screen.query_one(OptionList).highlighted_option.id == SOURCE
    assert listed["demo"].startswith("  demo  ") and "MB" in listed["demo"]
    assert {"hf:owner/name/d12", "hf:owner/name/d20", "hf:owner/name/archive/old"} <= set(listed)
    assert "native layout, step 500" in listed["hf:owner/name/d12"]
    assert "n_layer" in listed["nanochat:sft/d4"] and "kB" in listed["nanochat:sft/d4"]
    assert listed["hf:karpathy/nanochat-d32"].startswith("  hf:karpathy/nanochat-d32  ~7.3 GB")
    assert "hf:nanochat-students/nanochat-d20" in listed
    assert listed[SOURCE].startswith(f"● {SOURCE}")
    groups = [k for k in listed if k.startswith("group:")]
    assert groups == ["group:built-in", "group:hub-cache", "group:base-dir", "group:folder", "group:download"]


async def test_enter_on_a_row_switches_to_it_and_esc_closes_without_switching():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await chat_ready(pilot)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        await pilot.press("escape")
        assert app.screen is chat and app.model.source == SOURCE
        await pilot.press("f5")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        menu = app.screen.query_one(OptionList)
        menu.highlighted = menu.get_option_index("nanochat:sft/d4")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen is chat and chat.model.source != SOURCE)
        assert chat.model.source == "nanochat:sft/d4"


def greedy_after(source: str, turns: list[nc.Turn], text: str) -> str:
    """The reply ``source`` gives to ``text`` after ``turns`` (re-tokenized for it)."""
    model, tokenizer = nc.load(source, backend="mlx")
    session = nc.ChatSession(nc.Engine(model, tokenizer), params=PARAMS)
    for turn in turns:
        session.retokenize(turn)
    session.load_turns(turns)
    for _ in session.stream(text):
        pass
    return session.turns[-1].reply


async def test_switching_mid_chat_keeps_the_transcript_and_the_next_reply_comes_from_the_new_model(places):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await chat_ready(pilot)
        await send(pilot, chat, "Hello there")
        first = chat.session.turns[0]
        await pick(pilot, CACHED)
        await wait_for(pilot, lambda: app.screen is chat and chat.model.source.startswith(CACHED))
        assert [str(m.text) for m in chat.query(UserMessage)] == ["Hello there"]
        assert chat.query(AssistantMessage).first().text == first.reply
        expected = greedy_after(CACHED, [nc.Turn.from_dict(first.to_dict())], "and now?")
        await send(pilot, chat, "and now?")
        assert chat.session.turns[-1].reply == expected
        assert chat.query(AssistantMessage).last().text == expected
        assert chat.conversation.source.startswith(CACHED) and chat.conversation.generation == "g2"


async def test_the_model_switched_to_is_remembered_for_the_next_run():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await chat_ready(pilot)
        await send(pilot, chat, "/model nanochat:sft/d4")
        await wait_for(pilot, lambda: app.screen is chat and chat.model.source != SOURCE)
    assert last_source() == "nanochat:sft/d4"


async def test_a_source_that_fails_to_load_leaves_the_chat_on_its_model():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await chat_ready(pilot)
        await send(pilot, chat, "Hello")
        await send(pilot, chat, "/model /no/such/folder")
        await wait_for(pilot, lambda: app.screen is chat)
        await wait_for(pilot, lambda: any("no/such/folder" in n.message for n in app._notifications))
        assert chat.model.source == SOURCE and len(chat.session.turns) == 1
        await send(pilot, chat, "still there?")
        assert len(chat.session.turns) == 2 and chat.session.turns[-1].reply


def remote_repo(folder: Path) -> Path:
    """owner/remote on the fake Hub: the g9 fixture's files and its tokenizer at the root."""
    folder.mkdir()
    for f in (FIXTURES / "g9").iterdir():
        if f.is_file():
            shutil.copy(f, folder)
    shutil.copy(FIXTURES / "g9" / "tokenizer" / "tokenizer.pkl", folder)
    return folder


@pytest.fixture
def online(places: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], FakeHub]:
    """Start a fake Hub serving owner/remote (``stall``: a file it never finishes sending) and point the app at it."""
    import huggingface_hub.constants

    hubs: list[FakeHub] = []

    def start(stall: str | None = None) -> FakeHub:
        hub = FakeHub(remote_repo(places / "remote"), stall=stall)
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        hubs.append(hub)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        # huggingface_hub reads HF_ENDPOINT into these at import time.
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        return hub

    yield start
    for hub in hubs:
        hub.shutdown()


async def test_a_download_shows_its_bytes_on_the_progress_bar_and_cancel_returns_to_the_chat_on_the_old_model(online):
    hub = online(stall="model_000500.pt")
    size = (FIXTURES / "g9" / "model_000500.pt").stat().st_size
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await chat_ready(pilot)
        await send(pilot, chat, "Hello")
        await pick(pilot, "hf:owner/remote")
        assert isinstance(app.screen, LoadingScreen)
        bar = app.screen.query_one(ProgressBar)
        await wait_for(pilot, lambda: bar.total == size)  # the bytes of the file that downloads now
        assert "Downloading model_000500.pt · 0 B of 589.1 kB" == str(app.screen.query_one("#loading-detail").render())
        started = time.monotonic()
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is chat, timeout=2)
        assert time.monotonic() - started < 1.0
        assert chat.model.source == SOURCE
        await send(pilot, chat, "still there?")  # the model thread isn't held by the stalled download
        assert len(chat.session.turns) == 2 and chat.session.turns[-1].reply
    assert last_source() != "hf:owner/remote"
    assert any("model_000500.pt" in r for r in hub.requests)


async def test_a_finished_download_switches_to_the_downloaded_model(online):
    online()
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await chat_ready(pilot)
        await pick(pilot, "hf:owner/remote")
        await wait_for(pilot, lambda: app.screen is chat and chat.model.source.startswith("hf:owner/remote"))
    assert last_source() == "hf:owner/remote"
