"""A reply's message parts as the screen shows them (prose and calculator calls), and Markdown export."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from nanochat_mlx.session import Turn

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def sanitize(text: str) -> str:
    """Control characters (random models emit them) as visible control pictures (␕)."""
    return _CONTROL.sub(lambda m: "␡" if m.group() == "\x7f" else chr(0x2400 + ord(m.group())), text)


@dataclass
class Segment:
    """A run of prose (``kind="text"``) or one calculator call (``kind="tool"``)."""

    kind: str
    text: str = ""  # prose, or the tool's expression
    result: str | None = None
    state: str = "done"  # tool: "typing", "running", "output", "done" or "refused"


def segments(parts: list[dict], results: list[str | None] | None = None, finished: bool = True) -> list[Segment]:
    """The reply's parts (the reference's ``text``/``python``/``python_output``) as segments.

    ``results``: what the calculator answered to each closed python part so far (None: refused),
    while a reply streams; a finished reply needs none (a python part with no output got none).
    """
    segs: list[Segment] = []
    calls = 0
    for i, part in enumerate(parts):
        kind, text = part["type"], part["text"]
        last = i == len(parts) - 1
        if kind == "text":
            segs.append(Segment("text", text))
        elif kind == "python":
            if finished or not last:
                state = "refused"  # an output part that follows says otherwise
            elif results is not None and calls < len(results):
                state = "refused" if results[calls] is None else "running"
            else:
                state = "typing"
            calls += 1
            segs.append(Segment("tool", text, state=state))
        elif segs and segs[-1].kind == "tool" and segs[-1].result is None:  # the python part's output
            segs[-1].result, segs[-1].state = text, "output" if last and not finished else "done"
        else:  # an output with no call before it: show it as a call without an expression
            segs.append(Segment("tool", "", text))
    return segs


def plain_text(parts: list[dict]) -> str:
    """The reply as text to copy: tool calls written out as ``expr = result``."""
    out = []
    for seg in segments(parts):
        if seg.kind == "text":
            out.append(seg.text)
        else:
            out.append(f"`{seg.text} = {seg.result}`" if seg.result is not None else f"`{seg.text}`")
    return "".join(out)


def to_markdown(title: str, model: str, system: str | None, turns: list[Turn]) -> str:
    """A conversation as a Markdown document."""
    lines = [f"# {title}", "", f"_{model} · exported {time.strftime('%Y-%m-%d %H:%M')}_", ""]
    if system:
        lines += ["**System prompt:**", "", system, ""]
    for turn in turns:
        lines += ["## You", "", turn.user, "", "## nanochat", ""]
        for seg in segments(turn.parts):
            if seg.kind == "text":
                lines.append(seg.text.strip("\n"))
            else:
                result = seg.result if seg.result is not None else "(no result)"
                lines += ["", f"> 🧮 calculator: `{seg.text}` → `{result}`", ""]
        if turn.stopped:
            lines += ["", "_(stopped)_"]
        lines.append("")
    return "\n".join(lines)
