"""Streaming detokenization that never splits a UTF-8 character.

Python's incremental UTF-8 decoder holds back an incomplete sequence until its last byte
arrives and, with ``errors="replace"``, yields exactly what ``bytes.decode(errors="replace")``
(tiktoken's ``decode``) gives for the whole reply, so the deltas concatenate to ``decode(tokens)``.
"""

from __future__ import annotations

import codecs

from .tokenizer import Tokenizer


class StreamingDetokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """The text that ``token`` completes (possibly empty)."""
        return self._decoder.decode(self._tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        """Whatever is held back at the end (a dangling partial character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
