"""Copying text out: the system clipboard through the platform's tool, and the terminal's (OSC 52)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

TOOL_TIMEOUT_S = 2.0


def clipboard_tools() -> list[list[str]]:
    """Commands that put stdin on the system clipboard here, best first (none over SSH without a display)."""
    candidates = []
    if platform.system() == "Darwin":
        candidates.append(["pbcopy"])
    if os.environ.get("WAYLAND_DISPLAY"):
        candidates.append(["wl-copy"])
    if os.environ.get("DISPLAY"):
        candidates += [["xclip", "-selection", "clipboard"], ["xsel", "--clipboard", "--input"]]
    return [c for c in candidates if shutil.which(c[0])]


def copy_to_system(text: str) -> str | None:
    """Put ``text`` on the system clipboard; the tool that took it, or None when none could."""
    for command in clipboard_tools():
        try:
            done = subprocess.run(
                command,
                input=text.encode("utf-8"),
                stdout=subprocess.DEVNULL,  # xclip and wl-copy stay behind to serve the selection
                stderr=subprocess.DEVNULL,
                timeout=TOOL_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return command[0]
    return None
