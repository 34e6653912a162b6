"""Train the demo's BPE tokenizer as the reference's scripts/tok_train.py does: rustbpe learns the
merges with nanochat's split pattern, tiktoken encodes, nanochat's special tokens follow the merges."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import tiktoken

from nanochat_mlx.tokenizer import NANOCHAT_PATTERN, SPECIAL_TOKENS, Tokenizer
from nanochat_mlx.training.checkpoints import write_tokenizer

DOC_CAP = 10_000  # characters per document, as tok_train.py


def training_texts(data: Path) -> Iterator[str]:
    """The pretraining passages and every chat message's text (so digits and chat phrasing get merges)."""
    with open(data / "text.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"][:DOC_CAP]
    with open(data / "chat.jsonl", encoding="utf-8") as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                content = message["content"]
                yield content if isinstance(content, str) else "".join(p["text"] for p in content)


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A ``vocab_size``-token tokenizer (merges + the 9 special tokens), as RustBPETokenizer.train_from_iterator."""
    import rustbpe

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, vocab_size - len(SPECIAL_TOKENS), pattern=NANOCHAT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, "rustbpe")


def build(data: Path, out: Path, vocab_size: int) -> Tokenizer:
    """Train on ``data``'s files and write ``out/tokenizer.pkl`` and ``out/token_bytes.pt``."""
    tokenizer = train_tokenizer(training_texts(data), vocab_size)
    write_tokenizer(out, tokenizer)
    return Tokenizer.from_pickle(out / "tokenizer.pkl")
