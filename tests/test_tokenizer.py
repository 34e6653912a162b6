"""The tokenizer against the reference's ``tokenizer_cases.json``, the safe pickle loader and
the tokenizer.json (Hugging Face byte-level BPE) reader."""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import ALL_VARIANTS, expected_json, variant_dir

import nanochat_mlx as nc
from nanochat_mlx.errors import CheckpointError
from nanochat_mlx.tokenizer import Tokenizer


@functools.cache
def tok(variant: str) -> Tokenizer:
    return Tokenizer.from_pickle(variant_dir(variant) / "tokenizer" / "tokenizer.pkl")


def cases(variant: str) -> dict:
    return expected_json(variant, "tokenizer_cases.json")


N_ENCODE = len(cases("g1")["encode"])
N_RENDER = len(cases("g1")["render_conversation"])
N_PREPEND = len(cases("g1")["encode_prepend_bos"])


# --- the reference's cases ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("index", range(N_ENCODE))
def test_encode(variant: str, index: int) -> None:
    case = cases(variant)["encode"][index]
    assert tok(variant).encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("index", range(N_ENCODE))
def test_decode_roundtrip(variant: str, index: int) -> None:
    case = cases(variant)["encode"][index]
    assert tok(variant).decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("index", range(N_PREPEND))
def test_encode_prepend_bos(variant: str, index: int) -> None:
    case = cases(variant)["encode_prepend_bos"][index]
    assert tok(variant).encode(case["text"], prepend="<|bos|>") == case["ids"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_encode_batch_prepend_bos_append_assistant_end(variant: str) -> None:
    case = cases(variant)["encode_batch_prepend_bos_append_assistant_end"]
    t = tok(variant)
    assert t.encode(case["texts"], prepend=t.get_bos_token_id(), append="<|assistant_end|>") == case["ids"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("index", range(N_RENDER))
def test_render_conversation(variant: str, index: int) -> None:
    case = cases(variant)["render_conversation"][index]
    ids, mask = tok(variant).render_conversation(case["conversation"])
    assert ids == case["ids"]
    assert mask == case["mask"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_render_for_completion(variant: str) -> None:
    case = cases(variant)["render_for_completion"]
    assert tok(variant).render_for_completion(case["conversation"]) == case["ids"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_decode_mixed_special_tokens(variant: str) -> None:
    case = cases(variant)["decode_mixed"]
    assert tok(variant).decode(case["ids"]) == case["text"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_special_token_ids(variant: str) -> None:
    t = tok(variant)
    specials = cases(variant)["special_tokens"]
    assert {name: t.encode_special(name) for name in specials} == specials
    assert t.get_special_tokens() == set(specials)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_bos_id(variant: str) -> None:
    assert tok(variant).get_bos_token_id() == cases(variant)["bos_token_id"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_vocab_size(variant: str) -> None:
    assert tok(variant).get_vocab_size() == cases(variant)["vocab_size"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_token_bytes(variant: str) -> None:
    t = tok(variant)
    expected = cases(variant)["token_bytes_hex"]
    assert [t.enc.decode_single_token_bytes(i).hex() for i in range(len(expected))] == expected


def test_split_pattern_is_the_files() -> None:
    assert tok("g1").enc._pat_str == cases("g1")["pattern"]


# --- a malicious tokenizer.pkl ----------------------------------------------------------------


class _Exploit:
    """Unpickling this runs ``os.system`` (with the stock unpickler)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(_Exploit(marker)))
    return path


def test_malicious_tokenizer_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pkl = _malicious_pickle(tmp_path / "tokenizer.pkl", marker)
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_pickle(pkl)
    assert str(pkl) in str(err.value)
    assert "system" in str(err.value)
    assert not marker.exists()


def test_malicious_tokenizer_pickle_refused_by_load(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(variant_dir("g1"), folder, ignore=shutil.ignore_patterns("expected"))
    marker = tmp_path / "pwned"
    pkl = _malicious_pickle(folder / "tokenizer" / "tokenizer.pkl", marker)
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(pkl) in str(err.value)
    assert not marker.exists()


def test_tokenizer_pickle_of_wrong_class_is_refused(tmp_path: Path) -> None:
    """A harmless-looking but foreign global (collections.OrderedDict) is refused as well."""
    from collections import OrderedDict

    pkl = tmp_path / "tokenizer.pkl"
    pkl.write_bytes(pickle.dumps(OrderedDict(a=1)))
    with pytest.raises(CheckpointError, match="collections.OrderedDict"):
        Tokenizer.from_pickle(pkl)


def test_garbage_tokenizer_pickle_names_file(tmp_path: Path) -> None:
    pkl = tmp_path / "tokenizer.pkl"
    pkl.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_pickle(pkl)
    assert str(pkl) in str(err.value)


# --- tokenizer.json (byte-level BPE) ---------------------------------------------------------


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (written out independently)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]


def build_tokenizer_json(t: Tokenizer) -> dict:
    """A Hugging Face tokenizer.json equivalent to ``t`` (as transformers' tiktoken conversion writes)."""
    enc = t.enc
    b2u = gpt2_bytes_to_unicode()
    uni = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    ranks = enc._mergeable_ranks
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _bpe_split(ranks, token, rank)
            merges.append(f"{uni(left)} {uni(right)}")
    return {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": s,
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
            for s, i in sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {uni(token): rank for token, rank in ranks.items()},
            "merges": merges,
        },
    }


@pytest.fixture(scope="module")
def json_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tokjson") / "tokenizer.json"
    path.write_text(json.dumps(build_tokenizer_json(tok("g1"))), encoding="utf-8")
    return Tokenizer.from_tokenizer_json(path)


@pytest.mark.parametrize("index", range(N_ENCODE))
def test_tokenizer_json_encodes_like_pickle(json_tokenizer: Tokenizer, index: int) -> None:
    case = cases("g1")["encode"][index]
    assert json_tokenizer.encode(case["text"]) == case["ids"]


def test_tokenizer_json_special_tokens(json_tokenizer: Tokenizer) -> None:
    c = cases("g1")
    assert {name: json_tokenizer.encode_special(name) for name in c["special_tokens"]} == c["special_tokens"]
    assert json_tokenizer.get_vocab_size() == c["vocab_size"]
    assert json_tokenizer.get_bos_token_id() == c["bos_token_id"]


def test_tokenizer_json_token_bytes(json_tokenizer: Tokenizer) -> None:
    expected = cases("g1")["token_bytes_hex"]
    assert [json_tokenizer.enc.decode_single_token_bytes(i).hex() for i in range(len(expected))] == expected


@pytest.mark.parametrize("index", range(N_RENDER))
def test_tokenizer_json_render_conversation(json_tokenizer: Tokenizer, index: int) -> None:
    case = cases("g1")["render_conversation"][index]
    assert json_tokenizer.render_conversation(case["conversation"]) == (case["ids"], case["mask"])


def test_tokenizer_json_used_by_load(tmp_path: Path) -> None:
    """A native folder whose tokenizer is a tokenizer.json (no pickle) loads with it."""
    folder = tmp_path / "ckpt"
    shutil.copytree(variant_dir("g1"), folder, ignore=shutil.ignore_patterns("expected", "tokenizer"))
    (folder / "tokenizer.json").write_text(json.dumps(build_tokenizer_json(tok("g1"))), encoding="utf-8")
    _, t = nc.load(str(folder))
    assert t.source == str(folder / "tokenizer.json")
    case = cases("g1")["render_for_completion"]
    assert t.render_for_completion(case["conversation"]) == case["ids"]


def test_corrupt_tokenizer_json_names_file(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_tokenizer_json(path)
    assert str(path) in str(err.value)
