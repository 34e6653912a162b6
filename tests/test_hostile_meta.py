"""Hostile meta and config files: only regular files of bounded size are read, and every geometry
value is checked (against the weights, and sane limits) before anything is sized from it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from craft import assert_clean_failure, checkpoint_dir, fixture_state, run_cli

from nanochat_mlx.checkpoint import MAX_SEQUENCE_LEN, read_checkpoint
from nanochat_mlx.errors import CheckpointError

META = "meta_000500.json"


def model_config(**fields: object) -> Callable[[Path], None]:
    def edit(meta: Path) -> None:
        data = json.loads(meta.read_text())
        data["model_config"].update(fields)
        meta.write_text(json.dumps(data))

    return edit


def replace_with(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(meta: Path) -> None:
        meta.unlink()
        make(meta)

    return edit


CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    # once 25 s and 4 GiB before a MemoryError
    "n_layer 10**9": (model_config(n_layer=10**9), ("n_layer is 1000000000", "4 layers")),
    "n_layer one too many": (model_config(n_layer=5), ("n_layer is 5",)),
    # the models build rotary tables for 10 x sequence_len positions
    "sequence_len 10**6": (model_config(sequence_len=10**6), ("sequence_len", str(MAX_SEQUENCE_LEN))),
    "n_head 0": (model_config(n_head=0), ("n_head", "positive")),
    "n_kv_head negative": (model_config(n_kv_head=-2), ("n_kv_head",)),
    "n_embd as a string": (model_config(n_embd="48"), ('n_embd must be a positive integer, found "48"',)),
    "n_embd as a float": (model_config(n_embd=48.0), ("n_embd must be a positive integer, found 48.0",)),
    "vocab_size true": (model_config(vocab_size=True), ("vocab_size",)),
    "n_embd not matching the tensors": (model_config(n_embd=96, n_head=8, n_kv_head=4), ("shape",)),
    "window_pattern a number": (model_config(window_pattern=7), ("window_pattern",)),
    "window_pattern longer than the layers": (model_config(window_pattern="SL" * 10**5), ("window_pattern",)),
    "no model_config": (lambda m: m.write_text('{"step": 500}'), ("model_config",)),
    "a JSON list": (lambda m: m.write_text("[1, 2]"), ("JSON object",)),
    "not JSON": (lambda m: m.write_text("{"), ("not valid JSON",)),
    "nested 100000 deep": (lambda m: m.write_text("[" * 100_000), ("not valid JSON",)),
    "an int of 10**5 digits": (lambda m: m.write_text('{"model_config": ' + "9" * 100_000 + "}"), ("JSON",)),
    "not UTF-8": (lambda m: m.write_bytes(b"\xff\xfe{}"), ("JSON",)),
    "20 MB": (lambda m: m.write_text(" " * (20 << 20) + "{}"), ("more than",)),
    # once hung forever / read 1.8 GiB
    "a FIFO": (replace_with(os.mkfifo), ("not a regular file", "FIFO")),
    "a link to /dev/zero": (replace_with(lambda m: m.symlink_to("/dev/zero")), ("not a regular file",)),
    "a folder": (replace_with(lambda m: m.mkdir()), ("no meta file",)),
    "a dangling link": (replace_with(lambda m: m.symlink_to(m.parent / "nowhere")), ("cannot open",)),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_meta_is_refused_with_one_line(case: str, tmp_path: Path) -> None:
    edit, names = CASES[case]
    folder = checkpoint_dir(tmp_path / "ckpt")
    edit(folder / META)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(folder))
    message = str(err.value)
    assert "\n" not in message and (str(folder / META) in message or str(folder) in message), message
    for name in names:
        assert name in message, (name, message)


def test_config_json_layers_checked_against_the_weights(tmp_path: Path) -> None:
    """An mlx-lm folder whose config.json claims 10**9 layers, named as config.json names it."""
    from safetensors.numpy import save_file

    folder = tmp_path / "mlxlm"
    folder.mkdir()
    save_file({k: np.asarray(v, np.float32) for k, v in fixture_state().items()}, str(folder / "model.safetensors"))
    config = {"num_hidden_layers": 10**9, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 48}
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 400, "max_position_embeddings": 64}))
    (folder / "tokenizer.pkl").write_bytes(
        (checkpoint_dir(tmp_path / "c") / "tokenizer" / "tokenizer.pkl").read_bytes()
    )
    with pytest.raises(CheckpointError, match="n_layer is 1000000000"):
        read_checkpoint(str(folder))


def test_cli_refuses_a_billion_layers(tmp_path: Path) -> None:
    folder = checkpoint_dir(tmp_path / "ckpt")
    model_config(n_layer=10**9)(folder / META)
    assert_clean_failure(run_cli(folder), META, "n_layer")


def test_cli_refuses_a_fifo_meta_without_hanging(tmp_path: Path) -> None:
    folder = checkpoint_dir(tmp_path / "ckpt")
    replace_with(os.mkfifo)(folder / META)
    assert_clean_failure(run_cli(folder, timeout=20), META, "FIFO")
