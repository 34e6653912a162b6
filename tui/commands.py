"""Slash commands typed in the prompt."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlashCommand:
    name: str
    args: str
    help: str


COMMANDS = (
    SlashCommand("clear", "", "start a new chat (the current one stays saved)"),
    SlashCommand("regen", "", "regenerate the last reply"),
    SlashCommand("undo", "", "remove the last message and its reply"),
    SlashCommand("system", "TEXT", "set the system prompt (no text: clear it)"),
    SlashCommand("temp", "X", "set the temperature (0 = greedy)"),
    SlashCommand("topk", "K", "set top-k (0 or 'off': no limit)"),
    SlashCommand("save", "[name]", "save the chat, optionally under a name"),
    SlashCommand("load", "[name]", "reopen a saved chat (no name: pick from the list)"),
    SlashCommand("model", "[source]", "switch model, keeping the chat (no source: pick from the list)"),
    SlashCommand("export", "[path]", "write the chat as Markdown (to a file or folder; else here)"),
    SlashCommand("copy", "[code]", "copy the last reply (or its last code block)"),
    SlashCommand("settings", "", "open the settings"),
    SlashCommand("help", "", "show keys and commands"),
)
BY_NAME = {c.name: c for c in COMMANDS}


def parse(text: str) -> tuple[str, str] | None:
    """``("temp", "0.7")`` for ``/temp 0.7``; None for a message (``//text`` sends ``/text``)."""
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text[1:].partition(" ")
    return name.strip().lower(), arg.strip()


def suggestions(text: str) -> list[SlashCommand]:
    """Commands matching a partly typed ``/name``."""
    if not text.startswith("/") or " " in text or "\n" in text:
        return []
    prefix = text[1:].lower()
    return [c for c in COMMANDS if c.name.startswith(prefix)]
