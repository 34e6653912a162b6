"""Saved conversations: one JSON file each under the platform's user data dir, written atomically.

A file's name is its conversation's id. Files are read strictly: anything a hand edit or a crash
can leave (a wrong type, a truncated file, an id that isn't the file's name) makes the file
*unreadable*: it is listed as such and never written over or deleted. Every path the store
writes or deletes is a plain file name inside its folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs

from nanochat_mlx.engine import GenerationStats
from nanochat_mlx.errors import NanochatError
from nanochat_mlx.sampling import SamplingParams
from nanochat_mlx.session import Turn

APP_NAME = "nanochat-mlx"
FORMAT_VERSION = 2  # 2: replies as message parts
_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,99}")


def data_dir() -> Path:
    """``platformdirs.user_data_dir("nanochat-mlx")`` (``$XDG_DATA_HOME/nanochat-mlx`` on Linux)."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class Conversation:
    """A chat as saved on disk: who said what, with which model and settings."""

    id: str = field(default_factory=new_id)
    title: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    source: str = ""
    generation: str = ""
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # SamplingParams.to_dict()
    turns: list[Turn] = field(default_factory=list)

    @property
    def display_title(self) -> str:
        if self.title:
            return self.title
        first = " ".join(self.turns[0].user.split()) if self.turns else ""
        return (first[:60] + "…") if len(first) > 60 else (first or "New chat")

    def sampling(self, default: SamplingParams) -> SamplingParams:
        """The saved sampling parameters (those missing from the file as in ``default``)."""
        return default.with_(**self.params)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "id": self.id,
            "title": self.title,
            "created": self.created,
            "updated": self.updated,
            "source": self.source,
            "generation": self.generation,
            "system": self.system,
            "params": self.params,
            "turns": [t.to_dict() for t in self.turns],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Conversation:
        """A conversation saved by ``to_dict``; ValueError naming the first thing that's wrong."""
        if not isinstance(data, dict):
            raise ValueError("not a nanochat-mlx conversation (no JSON object)")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('version')!r}, this app reads {FORMAT_VERSION}")
        conv_id = data.get("id")
        if not isinstance(conv_id, str) or not _ID.fullmatch(conv_id):
            raise ValueError(f"bad id {conv_id!r}")
        for name in ("title", "source", "generation"):
            if not isinstance(data.get(name, ""), str):
                raise ValueError(f"{name!r} must be text, got {data[name]!r}")
        for name in ("created", "updated"):
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name!r} must be a time in seconds, got {value!r}")
        if not isinstance(data.get("system"), (str, type(None))):
            raise ValueError(f"'system' must be text or null, got {data['system']!r}")
        params = data.get("params", {})
        try:
            SamplingParams(**params)
        except (TypeError, NanochatError) as e:
            raise ValueError(f"bad 'params': {e}") from None
        turns = data.get("turns")
        if not isinstance(turns, list):
            raise ValueError(f"'turns' must be a list, got {turns!r}")
        parsed = []
        for i, turn in enumerate(turns):
            try:
                parsed.append(_turn(turn))
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise ValueError(f"turn {i + 1}: {e}") from None
        return cls(
            conv_id,
            data.get("title", ""),
            data["created"],
            data["updated"],
            data.get("source", ""),
            data.get("generation", ""),
            data.get("system"),
            dict(params),
            parsed,
        )


def _turn(data: Any) -> Turn:
    """``Turn.from_dict``, and numbers where the stats have numbers (the screen formats them)."""
    turn = Turn.from_dict(data)
    if turn.stats is not None:
        for f in fields(GenerationStats):
            value = getattr(turn.stats, f.name)
            expected = str if f.name == "stopped" else (int, float)
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ValueError(f"stats {f.name!r} is {value!r}")
    return turn


@dataclass(frozen=True)
class Unreadable:
    """A file in the conversations folder that isn't a conversation this app can open."""

    path: Path
    reason: str


class ConversationStore:
    """The conversations folder: save, list, find, load and delete chats."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else data_dir() / "conversations"

    def path(self, conv_id: str) -> Path:
        """The file of ``conv_id``: a plain name in the folder, never a path that leaves it."""
        if not isinstance(conv_id, str) or not _ID.fullmatch(conv_id):
            raise ValueError(f"bad conversation id {conv_id!r}")
        return self.root / f"{conv_id}.json"

    def save(self, conv: Conversation) -> Path:
        """Write ``conv``; refuses to replace a file that isn't that conversation (ValueError)."""
        path = self.path(conv.id)
        if path.exists() or path.is_symlink():
            self._read(path)  # an unreadable file is left as it is
        conv.updated = time.time()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(conv.to_dict(), ensure_ascii=False, indent=1))
        return path

    def load(self, conv_id: str) -> Conversation:
        return self._read(self.path(conv_id))

    def delete(self, conv_id: str) -> None:
        """Remove a saved conversation (only a readable one: an unreadable file stays)."""
        path = self.path(conv_id)
        if path.exists() or path.is_symlink():
            self._read(path)
            path.unlink()

    def scan(self) -> tuple[list[Conversation], list[Unreadable]]:
        """Every conversation, most recently updated first, and the files that can't be read."""
        if not self.root.is_dir():
            return [], []
        convs, bad = [], []
        for path in sorted(self.root.glob("*.json")):
            try:
                convs.append(self._read(path))
            except ValueError as e:
                bad.append(Unreadable(path, str(e)))
        return sorted(convs, key=lambda c: c.updated, reverse=True), bad

    def list(self) -> list[Conversation]:
        return self.scan()[0]

    def matches(self, name: str) -> list[Conversation]:
        """The conversations ``name`` picks, most recent first: the one with that id, else those with that
        title, else those whose id or title starts with it."""
        name = name.strip().lower()
        convs = self.list()
        tiers = (
            lambda keys: keys[0] == name,
            lambda keys: name in keys[1:],
            lambda keys: any(k.startswith(name) for k in keys if k),
        )
        for picks in tiers:
            found = [c for c in convs if picks((c.id.lower(), c.title.lower(), c.display_title.lower()))]
            if found:
                return found
        return []

    @staticmethod
    def _read(path: Path) -> Conversation:
        """The conversation in ``path``; ValueError (with why) for anything else."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"can't read it: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not valid JSON ({e})") from None
        conv = Conversation.from_dict(data)
        if conv.id != path.stem:
            raise ValueError(f"its id {conv.id!r} isn't its file name")
        return conv


def slug(text: str) -> str:
    return re.sub(r"[^\w-]+", "-", text.lower()).strip("-")[:50] or "chat"
