"""Export any checkpoint to an MLX-native folder: config.json + model.safetensors + tokenizer.

The folder keeps canonical (native nanochat) tensor names, so mlx-lm-style tools can read it, and
records the generation, the geometry and the quantization under config.json's ``"nanochat_mlx"``
key, so ``nanochat_mlx.load(out)`` rebuilds exactly the same model without detection guesses.
Output is written to a temporary folder beside OUT and renamed into place at the end.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import Checkpoint, read_checkpoint
from .errors import NanochatError
from .options import LoadOptions

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def convert(
    source: str | Checkpoint,
    out: str | Path,
    *,
    step: int | None = None,
    arch: str | None = None,
    dtype: str | None = None,
    quantize: int | None = None,
) -> Path:
    """Convert ``source`` (a source string or an in-memory Checkpoint) into the folder ``out``.

    ``dtype`` (default float32: lossless for every nanochat file) is the dtype of the saved
    floating-point tensors; ``quantize`` (4 or 8) stores group-64 affine-quantized linear and
    embedding layers. Refuses a non-empty ``out``. Returns the output folder.
    """
    if not str(out).strip():
        raise NanochatError("give the output folder (a new or empty one), got ''")
    out = Path(out).expanduser()
    _check_out(out)
    LoadOptions(str(source), step, arch, dtype, quantize)  # the same checks as every load
    dtype = dtype or "float32"
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(str(source), step=step, arch=arch)
    if ckpt.quantization and quantize is not None and quantize != ckpt.quantization.get("bits"):
        raise NanochatError(
            f"{ckpt.name}: already quantized to {ckpt.quantization.get('bits')} bits; convert the unquantized source"
        )
    from .backends.mlx.model import build_mlx_model

    model = build_mlx_model(ckpt, dtype=dtype, quantize=quantize)
    tensors = dict(tree_flatten(model.parameters()))
    quantization = None
    if quantize is not None or ckpt.quantization:
        quantization = {"group_size": 64, "bits": int(model.quantization), "mode": "affine"}
        if ckpt.quantization:
            quantization.update(ckpt.quantization)
        quantized = sorted(k[: -len(".scales")] for k in tensors if k.endswith(".scales"))
        quantization["quantized_layers"] = len(quantized)

    try:
        _write(out, tensors, ckpt, lambda tokenizer: _config_json(ckpt, dtype, quantization, tokenizer, source))
    except OSError as e:  # a read-only, full or missing place: say where, not the temporary folder's name
        raise NanochatError(f"{out}: cannot write the converted folder there ({e.strerror or e})") from None
    return out


def _write(out: Path, tensors: dict, ckpt: Checkpoint, config: Callable[[str], dict]) -> None:
    """The folder's files, written beside ``out`` and renamed into place only once complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, whose folder only its owner may read) gives the folder the user's umask.
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), tensors, metadata={"format": "mlx"})
        tokenizer = _write_tokenizer(ckpt, tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(config(tokenizer), indent=2) + "\n", encoding="utf-8")
        _check_out(out)  # something may have appeared meanwhile
        if out.exists():
            out.rmdir()  # an empty folder: replace it
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_out(out: Path) -> None:
    if out.is_dir():
        if any(out.iterdir()):
            raise NanochatError(f"{out}: output folder is not empty; choose a new or empty folder")
    elif out.exists():
        raise NanochatError(f"{out}: exists and is not a folder; choose a new or empty folder")


def _write_tokenizer(ckpt: Checkpoint, folder: Path) -> str:
    """Copy the tokenizer file the source used; an in-memory tokenizer is written as tiktoken ranks."""
    src = ckpt.files.tokenizer
    if src.is_file():
        name = (
            "tiktoken/tokenizer.model" if src.parent.name == "tiktoken" and src.name == "tokenizer.model" else src.name
        )
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / name)
        return name
    enc = ckpt.tokenizer.enc
    ranks = enc._mergeable_ranks
    n = len(ranks)
    from .tokenizer import SPECIAL_TOKENS

    if sorted(ranks.values()) != list(range(n)) or any(
        enc._special_tokens.get(tok) != n + i for i, tok in enumerate(SPECIAL_TOKENS)
    ):
        raise NanochatError(f"{ckpt.tokenizer.source}: tokenizer cannot be saved as a tiktoken ranks file")
    name = "tiktoken/tokenizer.model"
    (folder / "tiktoken").mkdir()
    lines = (
        base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in sorted(ranks.items(), key=lambda x: x[1])
    )
    (folder / name).write_bytes(b"\n".join(lines) + b"\n")
    return name


def _config_json(
    ckpt: Checkpoint, dtype: str, quantization: dict | None, tokenizer: str, source: Any
) -> dict[str, Any]:
    c = ckpt.config
    config: dict[str, Any] = {
        "model_type": "nanochat",
        "hidden_size": c.n_embd,
        "intermediate_size": 4 * c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.sequence_len,
        "rope_theta": ckpt.spec.rope_base,
        "final_logit_softcapping": ckpt.spec.softcap,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
    if quantization:
        config["quantization"] = {"group_size": quantization["group_size"], "bits": quantization["bits"]}
    config["nanochat_mlx"] = {
        "generation": ckpt.spec.name,
        "model_config": c.to_dict(),
        "quantization": quantization,
        "how": ckpt.how,
        "source": ckpt.name if isinstance(source, Checkpoint) else str(source),
        "dtype": dtype,
        "tokenizer": tokenizer,
        "format": 1,
    }
    return config
