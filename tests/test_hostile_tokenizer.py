"""Hostile tokenizer files: the ranks are validated before tiktoken's Rust core (which panics on
duplicate or missing ranks) ever sees them."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from craft import assert_clean_failure, checkpoint_dir, op_global, run_cli, tokenizer_pickle, tokenizer_state

from nanochat_mlx.errors import CheckpointError
from nanochat_mlx.tokenizer import NANOCHAT_PATTERN, Tokenizer


def state_edit(edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        state = tokenizer_state()
        edit(state)
        path.write_bytes(tokenizer_pickle(state))
        return path

    return build


def ranks(edit: Callable[[dict], object]) -> Callable[[dict], None]:
    return lambda state: edit(state["mergeable_ranks"])


def duplicate_rank(r: dict) -> None:
    r[next(b for b in r if len(b) > 1)] = 0


PKL_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "duplicate merge rank": (state_edit(ranks(duplicate_rank)), "duplicate"),
    "missing single byte": (state_edit(ranks(lambda r: r.pop(b"a"))), "duplicate or a gap"),
    "single byte renumbered away": (state_edit(ranks(lambda r: r.update({b"a": len(r) + 100}))), "gap"),
    "byte missing, ranks contiguous": (
        state_edit(ranks(lambda r: r.update({b"\x00\x00": r.pop(b"a")}))),
        "single-byte",
    ),
    "rank not an int": (state_edit(ranks(lambda r: r.update({b"a": "97"}))), "ints"),
    "token not bytes": (state_edit(ranks(lambda r: r.update({"zz": len(r)}))), "byte strings"),
    "ranks not a dict": (state_edit(lambda s: s.update(mergeable_ranks=[1, 2])), "ranks"),
    "special inside the ranks": (state_edit(lambda s: s["special_tokens"].update({"<|bos|>": 5})), "special"),
    "special missing": (state_edit(lambda s: s["special_tokens"].pop("<|python_end|>")), "special"),
    "unknown split pattern": (state_edit(lambda s: s.update(pat_str="(a*)*b")), "split pattern"),
    "os.system global": (
        lambda p: (p.write_bytes(b"\x80\x02" + op_global("os", "system") + b"X\x01\x00\x00\x00x\x85R."), p)[1],
        "os.system",
    ),
    "not a pickle": (lambda p: (p.write_bytes(b"hello"), p)[1], "corrupt"),
}


@pytest.mark.parametrize("case", PKL_CASES)
def test_hostile_tokenizer_pkl_is_refused_with_one_line(case: str, tmp_path: Path) -> None:
    build, word = PKL_CASES[case]
    path = build(tmp_path / "tokenizer.pkl")
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_pickle(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and word in message, message


def tokenizer_json(vocab: dict[str, int], added: list[dict]) -> dict:
    return {"model": {"type": "BPE", "vocab": vocab}, "added_tokens": added}


def json_vocab() -> tuple[dict[str, int], list[dict]]:
    from nanochat_mlx.tokenizer import _bytes_to_unicode

    table = _bytes_to_unicode()
    state = tokenizer_state()
    vocab = {"".join(table[b] for b in tok): i for tok, i in state["mergeable_ranks"].items()}
    added = [{"content": t, "id": i} for t, i in state["special_tokens"].items()]
    return vocab, added


def json_case(edit: Callable[[dict[str, int], list[dict]], object]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        vocab, added = json_vocab()
        edit(vocab, added)
        path.write_text(json.dumps(tokenizer_json(vocab, added)))
        return path

    return build


JSON_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "duplicate id": (json_case(lambda v, a: v.update({"zz": 300})), "duplicate"),
    "missing byte": (json_case(lambda v, a: v.pop("a")), "gap"),
    "vocab a list": (lambda p: (p.write_text('{"model": {"vocab": [1]}}'), p)[1], "byte-level"),
    "added token content a list": (json_case(lambda v, a: a[0].update(content=["x"])), "byte-level"),
}


@pytest.mark.parametrize("case", JSON_CASES)
def test_hostile_tokenizer_json_is_refused_with_one_line(case: str, tmp_path: Path) -> None:
    build, word = JSON_CASES[case]
    path = build(tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_tokenizer_json(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and word in message, message


def test_valid_tokenizer_json_loads(tmp_path: Path) -> None:
    path = json_case(lambda v, a: None)(tmp_path / "tokenizer.json")
    assert Tokenizer.from_tokenizer_json(path).vocab_size == 400
    assert NANOCHAT_PATTERN  # the default split pattern when the file names none


def test_tiktoken_file_with_duplicate_rank_is_refused(tmp_path: Path) -> None:
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)] + ["YWI= 5"]
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines))
    with pytest.raises(CheckpointError, match="duplicate"):
        Tokenizer.from_tiktoken_file(path)


def test_cli_refuses_duplicate_merge_rank_without_a_panic(tmp_path: Path) -> None:
    folder = checkpoint_dir(tmp_path / "ckpt")
    PKL_CASES["duplicate merge rank"][0](folder / "tokenizer" / "tokenizer.pkl")
    assert_clean_failure(run_cli(folder), "tokenizer.pkl", "duplicate")
