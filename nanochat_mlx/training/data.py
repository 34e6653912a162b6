"""Training data: read JSONL files, render them as the reference does, pack them into rows.

Three line formats are accepted: ``{"messages": [...]}`` (the OpenAI / mlx-lm chat format;
assistant content may be nanochat's list of text/python/python_output parts), a bare JSON array
of messages (nanochat's CustomJSON), and ``{"text": ...}`` for continued pretraining (every token
is trained). Conversations are rendered and masked by ``Tokenizer.render_conversation``.

Rows are packed as the reference's ``chat_sft`` does at HEAD (best fit from a buffer of 100
conversations; every row starts with BOS; the rest padded with BOS whose targets are -1), with
one difference: a conversation longer than a row is cropped to the row, where the reference's
packer would wait forever for it to fit (nanochat PRs #803/#811).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NanochatError

BUFFER_SIZE = 100  # conversations the best-fit packer chooses from (the reference's buffer_size)
RENDER_MAX_TOKENS = 2048  # render_conversation's default crop, which chat_sft keeps


@dataclass
class Example:
    """One rendered training example: token ids and their loss mask (1 = trained)."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # int8


@dataclass
class Dataset:
    """The good examples of a file, and a note for each bad line that was skipped."""

    path: Path
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)


def _example(record: Any, tokenizer: Any, row_capacity: int) -> list[Example]:
    """The examples of one parsed line (several for a text longer than a row); ValueError if malformed."""
    if isinstance(record, list):
        record = {"messages": record}
    if not isinstance(record, dict):
        raise ValueError(f"expected an object or an array of messages, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError('"messages" must be a list of {"role": ..., "content": ...} objects')
        for i, message in enumerate(messages):
            if "role" not in message or "content" not in message:
                raise ValueError(f'message {i} needs "role" and "content"')
            if not isinstance(message["content"], (str, list)):
                raise ValueError(f"message {i}: content must be text or a list of parts")
            if isinstance(message["content"], list) and not all(
                isinstance(p, dict) and isinstance(p.get("text"), str) and "type" in p for p in message["content"]
            ):
                raise ValueError(f'message {i}: every content part needs "type" and a text "text"')
        ids, mask = tokenizer.render_conversation({"messages": messages}, max_tokens=RENDER_MAX_TOKENS)
        if not any(mask[1:row_capacity]):
            raise ValueError(f"nothing to train on in the first {row_capacity} tokens: no assistant reply there")
        return [Example(np.asarray(ids, np.int32), np.asarray(mask, np.int8))]
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise ValueError('"text" must be a non-empty string')
        tokens = tokenizer.encode(text)
        # A long document becomes several rows' worth of pieces, each starting with BOS.
        step = row_capacity - 1
        bos = tokenizer.get_bos_token_id()
        return [
            Example(np.asarray([bos, *tokens[i : i + step]], np.int32), np.ones(len(tokens[i : i + step]) + 1, np.int8))
            for i in range(0, len(tokens), step)
        ]
    raise ValueError('expected "messages" (chat), "text" (pretraining) or an array of messages')


def read_dataset(path: str | Path, tokenizer: Any, row_capacity: int, strict: bool = False) -> Dataset:
    """Read and render a JSONL file. A bad line is an error with ``strict``, else skipped and noted."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise NanochatError(f"{path}: no such data file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NanochatError(f"{path}: cannot read the data file ({e})") from None
    examples: list[Example] = []
    skipped: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            examples.extend(_example(json.loads(line), tokenizer, row_capacity))
        except json.JSONDecodeError as e:
            problem = f"{path}:{number}: not JSON ({e.msg} at column {e.colno})"
        except RecursionError:  # json's decoder recurses once per nesting level
            problem = f"{path}:{number}: not JSON (nested too deeply)"
        except (ValueError, KeyError, TypeError) as e:
            problem = f"{path}:{number}: {e}"
        else:
            continue
        if strict:
            raise NanochatError(problem + " (without --strict, bad lines are skipped)")
        skipped.append(problem)
    if not examples:
        raise NanochatError(f"{path}: no usable examples" + (f" ({len(skipped)} bad lines)" if skipped else ""))
    return Dataset(path, examples, skipped)


@dataclass
class Row:
    """One packed row of ``row_capacity`` tokens and its mask (0 on padding)."""

    ids: np.ndarray
    mask: np.ndarray


def _best_fit(lengths: list[int], remaining: int) -> int:
    """Index of the longest length that fits (the first of equals), or -1."""
    best, best_len = -1, 0
    for i, n in enumerate(lengths):
        if best_len < n <= remaining:
            best, best_len = i, n
    return best


def pack_row(examples: list[Example], buffer: list[int], row_capacity: int, bos: int, refill) -> tuple[Row, int]:
    """Fill one row from ``buffer`` (indices into ``examples``), best fit first, as the reference.
    Returns the row and how many examples it took.

    ``refill()`` tops the buffer up (it may leave it short once data runs out). A conversation
    longer than the row is cropped when the row is still empty (the reference stalls on it).
    """
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    used = 0
    while used < row_capacity:
        refill()
        if not buffer:
            break
        remaining = row_capacity - used
        i = _best_fit([len(examples[j].ids) for j in buffer], remaining)
        if i < 0 and used == 0:
            i = 0  # every buffered conversation is longer than a row: crop the oldest
        if i < 0:
            break
        example = examples[buffer.pop(i)]
        ids.append(example.ids[:remaining])
        masks.append(example.mask[:remaining])
        used += len(ids[-1])
    pad = row_capacity - used
    ids.append(np.full(pad, bos, np.int32))
    masks.append(np.zeros(pad, np.int8))
    return Row(np.concatenate(ids), np.concatenate(masks)), len(ids) - 1


def batch_arrays(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (B x T) of packed rows: targets are -1 where the mask is 0 (the reference's)."""
    ids = np.stack([r.ids for r in rows]).astype(np.int64)
    mask = np.stack([r.mask for r in rows])
    targets = ids[:, 1:].copy()
    targets[mask[:, 1:] == 0] = -1
    return ids[:, :-1], targets


class Packer:
    """The training stream: rows packed from the examples, epoch after epoch, order shuffled by seed.

    Every process packs the same global stream (so a step's rows do not depend on the number of
    processes); ``state()`` and ``restore()`` carry the data position across a resume.
    """

    def __init__(self, dataset: Dataset, row_capacity: int, bos: int, seed: int) -> None:
        self.examples, self.row_capacity, self.bos, self.seed = dataset.examples, row_capacity, bos, seed
        self.epoch, self.cursor, self.consumed = 0, 0, 0
        self.buffer: list[int] = []
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def _refill(self) -> None:
        while len(self.buffer) < BUFFER_SIZE:
            self.buffer.append(int(self._order[self.cursor]))
            self.cursor += 1
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)

    def row(self) -> Row:
        row, taken = pack_row(self.examples, self.buffer, self.row_capacity, self.bos, self._refill)
        self.consumed += taken
        return row

    def rows(self, n: int) -> list[Row]:
        return [self.row() for _ in range(n)]

    @property
    def epochs_done(self) -> float:
        """Examples taken into rows, in epochs."""
        return self.consumed / len(self.examples)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "consumed": self.consumed, "buffer": list(self.buffer)}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor, self.consumed = state["epoch"], state["cursor"], state["consumed"]
        self.buffer = [int(i) for i in state["buffer"]]
        self._order = self._permutation(self.epoch)


def eval_rows(dataset: Dataset, row_capacity: int, bos: int) -> Iterator[Row]:
    """One pass over the examples in file order, packed as for training, until all are used."""
    order = iter(range(len(dataset.examples)))
    buffer: list[int] = []

    def refill() -> None:
        for i in order:
            buffer.append(i)
            if len(buffer) >= BUFFER_SIZE:
                return

    refill()
    while buffer:
        yield pack_row(dataset.examples, buffer, row_capacity, bos, refill)[0]
