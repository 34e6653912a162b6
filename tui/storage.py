"""Saved conversations: one JSON file each under the platform's user data dir, written atomically."""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

APP_NAME = "nanochat-mlx"
FORMAT_VERSION = 1


def data_dir() -> Path:
    """``platformdirs.user_data_dir("nanochat-mlx")`` (``$XDG_DATA_HOME/nanochat-mlx`` on Linux)."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
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
    params: dict[str, Any] = field(default_factory=dict)
    turns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def display_title(self) -> str:
        if self.title:
            return self.title
        first = next((t.get("user", "") for t in self.turns), "")
        first = " ".join(first.split())
        return (first[:60] + "…") if len(first) > 60 else (first or "New chat")

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        if not isinstance(data, dict) or not isinstance(data.get("turns", []), list):
            raise ValueError("not a nanochat-mlx conversation")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class ConversationStore:
    """The conversations folder: save, list, find and load chats."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else data_dir() / "conversations"

    def path(self, conv_id: str) -> Path:
        if not re.fullmatch(r"[\w.-]+", conv_id):
            raise ValueError(f"bad conversation id {conv_id!r}")
        return self.root / f"{conv_id}.json"

    def save(self, conv: Conversation) -> Path:
        conv.updated = time.time()
        path = self.path(conv.id)
        atomic_write_text(path, json.dumps(conv.to_dict(), ensure_ascii=False, indent=1))
        return path

    def load(self, conv_id: str) -> Conversation:
        return self._read(self.path(conv_id))

    def delete(self, conv_id: str) -> None:
        self.path(conv_id).unlink(missing_ok=True)

    def list(self) -> list[Conversation]:
        """Every readable conversation, most recently updated first (unreadable files are skipped)."""
        if not self.root.is_dir():
            return []
        convs = []
        for path in self.root.glob("*.json"):
            try:
                convs.append(self._read(path))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(convs, key=lambda c: c.updated, reverse=True)

    def find(self, name: str) -> Conversation | None:
        """The conversation whose id or title is ``name`` (or, failing that, starts with it)."""
        name = name.strip().lower()
        convs = self.list()
        for exact in (True, False):
            for conv in convs:
                keys = (conv.id.lower(), conv.title.lower(), conv.display_title.lower())
                if any(k == name if exact else k.startswith(name) for k in keys if k):
                    return conv
        return None

    @staticmethod
    def _read(path: Path) -> Conversation:
        return Conversation.from_dict(json.loads(path.read_text(encoding="utf-8")))


def exports_dir() -> Path:
    return data_dir() / "exports"


def slug(text: str) -> str:
    return re.sub(r"[^\w-]+", "-", text.lower()).strip("-")[:50] or "chat"
