"""nanochat's tokenizer: tiktoken BPE loaded safely, plus the reference's chat rendering.

``tokenizer.pkl`` is a pickled ``tiktoken.Encoding``; we read it with an unpickler that allows
that one class (as a stub capturing its state) and rebuild the Encoding ourselves. The method
names and results follow the reference's ``RustBPETokenizer``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import io
import pickle
from pathlib import Path
from typing import Any

import tiktoken

from .errors import CheckpointError
from .fileio import MiB, read_bytes, read_json

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

# nanochat's split pattern, used when a tokenizer file does not carry its own.
NANOCHAT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# The split patterns a tokenizer file may name: nanochat's and GPT-4's (digits in threes). A pattern
# is a program tiktoken runs on every input; an unknown one could backtrack without end.
KNOWN_PATTERNS = (NANOCHAT_PATTERN, NANOCHAT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}"))
TOKENIZER_LIMIT = 64 * MiB  # nanochat's 65536-token tokenizer.pkl is ~1 MiB


class _EncodingState:
    """Stand-in for tiktoken.core.Encoding while unpickling: records the BUILD state."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TokenizerUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its memo is a dict, not an array
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise CheckpointError(
            f"{self._path}: refused to load: the pickle asks for the global {module}.{name}; "
            "a tokenizer.pkl only ever holds tiktoken.core.Encoding (nothing was executed)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self._path}: unexpected persistent id in tokenizer pickle")


class Tokenizer:
    """BPE tokenizer with nanochat's special tokens and conversation rendering."""

    def __init__(self, encoding: tiktoken.Encoding, source: str = "") -> None:
        self.enc = encoding
        self.source = source
        missing = [t for t in SPECIAL_TOKENS if t not in encoding._special_tokens]
        if missing:
            raise CheckpointError(f"{source}: tokenizer lacks nanochat special tokens {missing}")
        self.bos_token_id = self.encode_special("<|bos|>")

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pickle(cls, path: str | Path) -> Tokenizer:
        """Load a nanochat ``tokenizer.pkl`` with the allow-listed unpickler."""
        path = Path(path)
        data = read_bytes(path, TOKENIZER_LIMIT, "tokenizer file")
        try:
            obj = _TokenizerUnpickler(data, path).load()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt tokenizer pickle ({type(e).__name__})") from None
        state = getattr(obj, "state", None)
        keys = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
        if not isinstance(state, dict) or not keys <= state.keys():
            raise CheckpointError(f"{path}: not a pickled tiktoken Encoding")
        enc = _encoding(path, state["name"], state["pat_str"], state["mergeable_ranks"], state["special_tokens"])
        return cls(enc, str(path))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json`` (byte-level BPE, as transformers converts it)."""
        path = Path(path)
        data = read_json(path, "tokenizer file", TOKENIZER_LIMIT)
        try:
            vocab = data["model"]["vocab"]
            added = [(t["content"], t["id"]) for t in data.get("added_tokens") or []]
            byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
            ranks = {bytes(byte_of[ch] for ch in tok): i for tok, i in vocab.items()}
            pattern = _split_pattern(data) or NANOCHAT_PATTERN
            in_vocab = set(ranks.values())
            specials = {content: i for content, i in added if i not in in_vocab}
        except (KeyError, TypeError, AttributeError, ValueError):
            raise CheckpointError(f"{path}: not a byte-level BPE tokenizer.json (model.vocab, added_tokens)") from None
        special_ids = set(specials.values())
        ranks = {b: i for b, i in ranks.items() if i not in special_ids}
        return cls(_encoding(path, path.parent.name or "nanochat", pattern, ranks, specials), str(path))

    @classmethod
    def from_tiktoken_file(cls, path: str | Path) -> Tokenizer:
        """Load a tiktoken ranks file (``base64-token rank`` lines); specials follow the ranks."""
        path = Path(path)
        lines = read_bytes(path, TOKENIZER_LIMIT, "tokenizer file").splitlines()
        try:
            pairs = (line.split() for line in lines if line)
            ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in pairs}
        except (ValueError, binascii.Error):
            raise CheckpointError(f"{path}: not a tiktoken ranks file (lines of base64 token and rank)") from None
        specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        return cls(_encoding(path, "nanochat", NANOCHAT_PATTERN, ranks, specials), str(path))

    # --- the reference's API ---------------------------------------------------------------
    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of more than context x this can't fit the context."""
        return max(map(len, self.enc.token_byte_values()), default=1)

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> set[str]:
        return set(self.enc.special_tokens_set)

    def encode_special(self, text: str) -> int:
        return self.enc.encode_single_token(text)

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode([token_id])

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None):
        """Encode ordinary text (special-token text stays text); lists encode row by row."""
        pre = self._special_id(prepend)
        post = self._special_id(append)
        if isinstance(text, str):
            return self._wrap(self.enc.encode_ordinary(text), pre, post)
        return [self._wrap(ids, pre, post) for ids in self.enc.encode_ordinary_batch(list(text))]

    def encode_with_specials(self, text: str) -> list[int]:
        """Encode text in which special-token strings ("<|bos|>") are those tokens, as HF tokenizers read text."""
        return self.enc.encode(text, allowed_special="all")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and training mask (1 = assistant-produced) of a conversation, as the reference."""
        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            messages = copy.deepcopy(messages)
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        if not messages:
            raise ValueError("conversation has no messages")
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], m: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = {name: self.encode_special(name) for name in SPECIAL_TOKENS}
        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} is from {message['role']}, expected {expected}")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError("user messages must be text")
                add(sp["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                for part in content:
                    tokens = self.encode(part["text"])
                    if part["type"] == "text":
                        add(tokens, 1)
                    elif part["type"] == "python":
                        add([sp["<|python_start|>"], *tokens, sp["<|python_end|>"]], 1)
                    elif part["type"] == "python_output":
                        add([sp["<|output_start|>"], *tokens, sp["<|output_end|>"]], 0)
                    else:
                        raise ValueError(f"unknown assistant part type {part['type']!r}")
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict, max_tokens: int = 2048) -> list[int]:
        """Prompt ids that prime the assistant's reply to a conversation ending in an assistant turn."""
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (it is replaced by the reply)")
        messages.pop()
        ids, _ = self.render_conversation(conversation, max_tokens=max_tokens)
        return ids + [self.encode_special("<|assistant_start|>")]

    # --- helpers ---------------------------------------------------------------------------
    def _special_id(self, token: int | str | None) -> int | None:
        return self.encode_special(token) if isinstance(token, str) else token

    @staticmethod
    def _wrap(ids: list[int], pre: int | None, post: int | None) -> list[int]:
        return ([pre] if pre is not None else []) + ids + ([post] if post is not None else [])


def _encoding(path: Path, name: Any, pat_str: Any, ranks: Any, specials: Any) -> tiktoken.Encoding:
    """A tiktoken Encoding from checked parts (tiktoken's Rust core panics on inconsistent ranks).

    Ranks: distinct byte strings numbered 0..n-1 without gaps, every single byte among them;
    specials: the nanochat ones, numbered n, n+1, ... right after the ranks.
    """
    where = f"{path}: tokenizer"
    if not isinstance(name, str) or pat_str not in KNOWN_PATTERNS:
        raise CheckpointError(f"{where} has an unknown split pattern (known: nanochat's and GPT-4's)")
    if not isinstance(ranks, dict) or not all(type(b) is bytes and b and type(i) is int for b, i in ranks.items()):
        raise CheckpointError(f"{where} ranks must map non-empty byte strings to ints")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{where} ranks are not 0..{len(ranks) - 1}, each once (a duplicate or a gap)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} of the 256 single-byte tokens (first: byte {missing[0]})")
    if not isinstance(specials, dict) or not all(type(t) is str and type(i) is int for t, i in specials.items()):
        raise CheckpointError(f"{where} special tokens must map strings to ints")
    if sorted(specials.values()) != list(range(len(ranks), len(ranks) + len(specials))):
        raise CheckpointError(f"{where} special tokens are not numbered from {len(ranks)} (after the ranks), each once")
    lacking = [t for t in SPECIAL_TOKENS if t not in specials]
    if lacking:
        raise CheckpointError(f"{where} lacks nanochat special tokens {lacking}")
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _split_pattern(data: dict) -> str | None:
    """The regex of a tokenizer.json Split pre-tokenizer, if it has one."""
    stack = [data.get("pre_tokenizer") or {}]
    while stack:
        node = stack.pop()
        if node.get("type") == "Split" and "Regex" in (node.get("pattern") or {}):
            return node["pattern"]["Regex"]
        stack.extend(node.get("pretokenizers", []))
    return None
