"""Training data: the three line formats, bad lines, and the reference's best-fit packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import variant_dir

from nanochat_mlx.errors import NanochatError
from nanochat_mlx.tokenizer import Tokenizer
from nanochat_mlx.training.data import BUFFER_SIZE, Example, Packer, batch_arrays, eval_rows, pack_row, read_dataset

CHAT = {"messages": [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}]}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pickle(variant_dir("g9") / "tokenizer" / "tokenizer.pkl")


def write(tmp_path, lines: list) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_chat_lines_are_rendered_and_masked_by_render_conversation(tmp_path, tok):
    ids, mask = tok.render_conversation(CHAT)
    (example,) = read_dataset(write(tmp_path, [CHAT]), tok, 65).examples
    assert example.ids.tolist() == ids and example.mask.tolist() == mask


def test_a_bare_array_of_messages_is_nanochats_custom_json(tmp_path, tok):
    (a,) = read_dataset(write(tmp_path, [CHAT["messages"]]), tok, 65).examples
    assert a.ids.tolist() == tok.render_conversation(CHAT)[0]


def test_assistant_parts_with_python_and_its_output(tmp_path, tok):
    parts = [
        {"type": "text", "text": "let me compute "},
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "so 5"},
    ]
    convo = {"messages": [CHAT["messages"][0], {"role": "assistant", "content": parts}]}
    (example,) = read_dataset(write(tmp_path, [convo]), tok, 256).examples
    assert example.mask.tolist() == tok.render_conversation(convo)[1]
    assert 0 in example.mask[np.flatnonzero(example.ids == tok.encode_special("<|output_start|>"))[0] :].tolist()


def test_text_lines_train_every_token(tmp_path, tok):
    (example,) = read_dataset(write(tmp_path, [{"text": "hello world"}]), tok, 65).examples
    assert example.ids.tolist() == [tok.get_bos_token_id(), *tok.encode("hello world")]
    assert example.mask.all()


def test_a_long_text_splits_into_row_sized_pieces_each_starting_with_bos(tmp_path, tok):
    text = "the quick brown fox jumps over the lazy dog " * 20
    examples = read_dataset(write(tmp_path, [{"text": text}]), tok, 33).examples
    assert len(examples) > 1 and all(len(e.ids) <= 33 and e.ids[0] == tok.get_bos_token_id() for e in examples)
    assert sum(len(e.ids) - 1 for e in examples) == len(tok.encode(text))


def test_bad_lines_are_skipped_and_noted_with_file_and_line(tmp_path, tok):
    path = write(tmp_path, [CHAT, "{not json", {"messages": [{"role": "assistant", "content": "hi"}]}, {"x": 1}, CHAT])
    data = read_dataset(path, tok, 65)
    assert len(data.examples) == 2 and len(data.skipped) == 3
    assert data.skipped[0].startswith(f"{path}:2: not JSON")
    assert data.skipped[1] == f"{path}:3: message 0 is from assistant, expected user"
    assert data.skipped[2].startswith(f"{path}:4: expected")


def test_a_line_nested_too_deeply_is_a_bad_line_not_a_crash(tmp_path, tok):
    path = write(tmp_path, [CHAT, "[" * 100_000, CHAT])
    data = read_dataset(path, tok, 65)
    assert len(data.examples) == 2 and data.skipped == [f"{path}:2: not JSON (nested too deeply)"]


def test_strict_stops_at_the_first_bad_line_in_one_line(tmp_path, tok):
    path = write(tmp_path, [CHAT, {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(NanochatError) as e:
        read_dataset(path, tok, 65, strict=True)
    assert str(e.value).startswith(f"{path}:2: nothing to train on") and "\n" not in str(e.value)


def test_a_file_without_usable_lines_is_an_error(tmp_path, tok):
    with pytest.raises(NanochatError, match="no usable examples"):
        read_dataset(write(tmp_path, ["[]", "{}"]), tok, 65)
    with pytest.raises(NanochatError, match="no such data file"):
        read_dataset(tmp_path / "missing.jsonl", tok, 65)


def ex(n: int, start: int = 10) -> Example:
    return Example(np.arange(start, start + n, dtype=np.int32), np.ones(n, np.int8))


def test_best_fit_takes_the_longest_conversation_that_fits_then_pads_with_bos():
    examples = [ex(1, 100), ex(6, 200), ex(4, 300), ex(9, 400)]
    buffer = [0, 1, 2, 3]
    row, taken = pack_row(examples, buffer, 8, 0, lambda: None)
    # 6 fits first (9 does not), then 1 (4 no longer fits); 1 token of padding.
    assert row.ids.tolist() == [*range(200, 206), 100, 0] and taken == 2
    assert row.mask.tolist() == [1] * 7 + [0] and buffer == [2, 3]


def test_a_conversation_longer_than_a_row_is_cropped_not_stalled():
    row, taken = pack_row([ex(20)], [0], 8, 0, lambda: None)
    assert row.ids.tolist() == list(range(10, 18)) and taken == 1


def test_targets_are_minus_one_where_the_mask_is_zero():
    row, _ = pack_row([Example(np.array([1, 5, 6], np.int32), np.array([0, 0, 1], np.int8))], [0], 5, 1, lambda: None)
    x, y = batch_arrays([row])
    assert x.tolist() == [[1, 5, 6, 1]] and y.tolist() == [[-1, 6, -1, -1]]


def test_packer_rows_start_with_bos_and_resume_from_their_state(tmp_path, tok):
    lines = [
        {"messages": [{"role": "user", "content": f"q{i} " * (i % 7 + 1)}, {"role": "assistant", "content": "a"}]}
        for i in range(40)
    ]
    data = read_dataset(write(tmp_path, lines), tok, 65)
    a = Packer(data, 65, tok.get_bos_token_id(), seed=1)
    a.rows(5)
    b = Packer(data, 65, tok.get_bos_token_id(), seed=1)
    b.restore(json.loads(json.dumps(a.state())))
    for ra, rb in zip(a.rows(7), b.rows(7), strict=True):
        assert ra.ids[0] == tok.get_bos_token_id() and np.array_equal(ra.ids, rb.ids)
    assert a.epoch >= 2  # filling a buffer of BUFFER_SIZE from 40 examples wraps into later epochs
    assert len(a.buffer) == BUFFER_SIZE


def test_validation_rows_use_every_example_once(tmp_path, tok):
    data = read_dataset(write(tmp_path, [CHAT] * 250), tok, 65)
    rows = list(eval_rows(data, 65, tok.get_bos_token_id()))
    per_row = 65 // len(data.examples[0].ids)
    assert len(rows) == -(-250 // per_row)
