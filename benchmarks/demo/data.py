"""Write the demo model's data sets as JSONL: pretraining text, chat, held-out text and questions.

Files (in ``out``): ``text.jsonl`` ({"text"}: Shakespeare in ~1,000-character passages),
``val_text.jsonl`` (held-out plays, for bits per byte), ``chat.jsonl`` ({"messages"}: arithmetic
through the calculator, identity, spelling and letter counting, chit-chat), ``eval_arithmetic.jsonl``
(held-out arithmetic questions, none of them in chat.jsonl), ``spelling_words.json`` (the words the
spelling conversations drill).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from nanochat_mlx.tools import use_calculator

from . import conversations as conv
from .corpora import chitchat_conversations, shakespeare_texts

VAL_WORKS = ("tempest", "sonnets")  # held out from training: a play and the poems
PASSAGE_CHARS = 1000
CHAT_MIX = {"arithmetic": 21000, "identity": 2000, "spelling": 8000, "chitchat": 5000}
EVAL_QUESTIONS = 400


def passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """``text`` cut at line ends into passages of about ``size`` characters."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= size:
            out.append(current.strip("\n"))
            current = ""
    if current.strip():
        out.append(current.strip("\n"))
    return out


def spelling_words(texts: list[str], n: int = 1000) -> list[str]:
    """The ``n`` most frequent lower-case words of 3-10 letters that the calculator will count in
    (it refuses texts holding names such as "open" or "dir", as the reference's does)."""
    counts = Counter(w for t in texts for w in re.findall(r"\b[a-z]{3,10}\b", t))
    countable = [w for w, _ in counts.most_common() if use_calculator(f"'{w}'.count('a')") is not None]
    return countable[:n]


def _arithmetic_key(c: conv.Conversation) -> str:
    return c["messages"][1]["content"][0]["text"]  # the expression the tool gets


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(out: Path, cache: Path, seed: int = 0) -> dict[str, int]:
    """Write every data file into ``out``; returns {file: rows}."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    works = shakespeare_texts(cache)
    train_texts = [t for name, t in works.items() if name not in VAL_WORKS]
    text_rows = [{"text": p} for t in train_texts for p in passages(t)]
    rng.shuffle(text_rows)
    val_rows = [{"text": p} for name in VAL_WORKS for p in passages(works[name])]

    words = spelling_words(train_texts)
    chats = chitchat_conversations()
    makers = {
        "arithmetic": lambda: conv.arithmetic(rng),
        "identity": lambda: conv.identity(rng),
        "spelling": lambda: conv.spelling(rng, words),
        "chitchat": lambda: conv.chitchat(rng.choice(chats), rng),
    }
    chat_rows = [makers[kind]() for kind, n in CHAT_MIX.items() for _ in range(n)]
    rng.shuffle(chat_rows)

    seen = {_arithmetic_key(c) for c in chat_rows if isinstance(c["messages"][1]["content"], list)}
    eval_rng, questions = random.Random(seed + 1), []
    while len(questions) < EVAL_QUESTIONS:
        c = conv.arithmetic(eval_rng)
        if _arithmetic_key(c) not in seen:
            seen.add(_arithmetic_key(c))
            questions.append(c)

    files = {
        "text.jsonl": text_rows,
        "val_text.jsonl": val_rows,
        "chat.jsonl": chat_rows,
        "eval_arithmetic.jsonl": questions,
    }
    for name, rows in files.items():
        write_jsonl(out / name, rows)
    (out / "spelling_words.json").write_text(json.dumps(words) + "\n", encoding="utf-8")
    return {name: len(rows) for name, rows in files.items()}
