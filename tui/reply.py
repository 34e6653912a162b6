"""Reading a reply's text: prose and calculator calls, and Markdown export of a conversation."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

PY_START, PY_END = "<|python_start|>", "<|python_end|>"
OUT_START, OUT_END = "<|output_start|>", "<|output_end|>"
SPECIAL_TOKENS = (
    "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
    PY_START, PY_END, OUT_START, OUT_END,
)  # fmt: skip

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


def split_reply(reply: str, finished: bool = False) -> list[Segment]:
    """Cut a reply into prose and tool calls at the special-token markers the engine streams."""
    segs: list[Segment] = []
    i = 0
    while i < len(reply):
        j = reply.find(PY_START, i)
        if j < 0:
            segs.append(Segment("text", reply[i:]))
            break
        if j > i:
            segs.append(Segment("text", reply[i:j]))
        j += len(PY_START)
        k = reply.find(PY_END, j)
        if k < 0:
            segs.append(Segment("tool", reply[j:], state="refused" if finished else "typing"))
            break
        seg = Segment("tool", reply[j:k], state="running")
        i = k + len(PY_END)
        if reply.startswith(OUT_START, i):
            i += len(OUT_START)
            m = reply.find(OUT_END, i)
            if m < 0:
                seg.result, seg.state, i = reply[i:], "done" if finished else "output", len(reply)
            else:
                seg.result, seg.state, i = reply[i:m], "done", m + len(OUT_END)
        elif i < len(reply) or finished:
            seg.state = "refused"
        segs.append(seg)
    return segs


def plain_reply(reply: str) -> str:
    """The reply as text to copy: tool calls written out as ``calc(expr) = result``."""
    parts = []
    for seg in split_reply(reply, finished=True):
        if seg.kind == "text":
            parts.append(seg.text)
        else:
            parts.append(f"`{seg.text} = {seg.result}`" if seg.result is not None else f"`{seg.text}`")
    return "".join(parts)


def to_markdown(title: str, model: str, system: str | None, turns: list[dict]) -> str:
    """A conversation as a Markdown document."""
    lines = [f"# {title}", "", f"_{model} · exported {time.strftime('%Y-%m-%d %H:%M')}_", ""]
    if system:
        lines += ["**System prompt:**", "", system, ""]
    for turn in turns:
        lines += ["## You", "", turn.get("user", ""), "", "## nanochat", ""]
        for seg in split_reply(turn.get("reply", ""), finished=True):
            if seg.kind == "text":
                lines.append(seg.text.strip("\n"))
            else:
                result = seg.result if seg.result is not None else "(no result)"
                lines += ["", f"> 🧮 calculator: `{seg.text}` → `{result}`", ""]
        if turn.get("stopped"):
            lines += ["", "_(stopped)_"]
        lines.append("")
    return "\n".join(lines)


def retokenize(tokenizer, text: str) -> list[int]:
    """Token ids for a saved reply's text, with the markers as special tokens (for another model)."""
    pattern = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))
    ids: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            ids += tokenizer.encode(text[pos : m.start()])
        ids.append(tokenizer.encode_special(m.group()))
        pos = m.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:])
    return ids
