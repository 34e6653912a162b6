"""From checkpoint files to canonical weights + architecture spec + tokenizer (no backend yet)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ArchSpec, ModelConfig, get_spec
from .errors import CheckpointError
from .sources import CheckpointFiles, resolve
from .tokenizer import Tokenizer
from .weights import Detection, Weights, canonicalize, detect_generation, read_tensors, validate


@dataclass
class Checkpoint:
    """Everything a backend needs to build a model, decided once."""

    files: CheckpointFiles
    config: ModelConfig
    spec: ArchSpec
    how: str  # how the generation was decided
    weights: Weights
    tokenizer: Tokenizer
    meta: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, int] | None = None  # set for quantized converted folders
    notes: list[str] = field(default_factory=list)  # warnings worth showing the user

    @property
    def name(self) -> str:
        return self.files.origin

    @property
    def n_params(self) -> int:
        return sum(int(w.size) for w in self.weights.values())


def read_checkpoint(source: str, step: int | None = None, arch: str | None = None) -> Checkpoint:
    """Resolve ``source``, read and validate its weights, and decide its generation."""
    files = resolve(source, step)
    tokenizer = _load_tokenizer(files.tokenizer)
    raw = read_tensors(files.weights)
    weights = canonicalize(raw, files.origin)
    notes = list(files.notes)
    quantization = None
    if files.layout == "native":
        meta = _read_json(files.meta)
        config = _config_from_meta(meta, weights, files.meta, notes)
        detection = detect_generation(weights, config, meta, files.origin)
    else:
        meta = _read_json(files.config)
        config, detection, quantization = _config_from_json(meta, weights, files, tokenizer.vocab_size, notes)
    if arch is not None:
        spec, how = get_spec(arch), f"set explicitly (arch={arch}); files suggest {detection.spec.name}"
    else:
        spec, how = detection.spec, detection.reason
        if detection.ambiguous_with:
            notes.append(
                f"generation is ambiguous: read as {spec.name}, could also be "
                f"{' or '.join(detection.ambiguous_with)} (use --arch to choose)"
            )
    weights = validate(weights, config, spec, files.origin)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{files.tokenizer}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {config.vocab_size} ({files.meta or files.config})"
        )
    return Checkpoint(files, config, spec, how, weights, tokenizer, meta, quantization, notes)


def warn(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _load_tokenizer(path: Path) -> Tokenizer:
    if path.name == "tokenizer.pkl":
        return Tokenizer.from_pickle(path)
    if path.name == "tokenizer.json":
        return Tokenizer.from_tokenizer_json(path)
    return Tokenizer.from_tiktoken_file(path)


def _read_json(path: Path | None) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _padded_rows(weights: Weights, origin: Any) -> int:
    wte = weights.get("transformer.wte.weight")
    if wte is None or wte.ndim != 2:
        raise CheckpointError(f"{origin}: missing tensor transformer.wte.weight")
    return int(wte.shape[0])


def _unpadded_vocab(config_vocab: int, tokenizer_size: int) -> int:
    """mlx-lm sizes wte from config vocab_size, so its folders of padded (g2+) models record the
    padded row count: the tokenizer's size is the real vocab when the rows are just its padding."""
    if tokenizer_size < config_vocab == -(-tokenizer_size // 64) * 64:
        return tokenizer_size
    return config_vocab


def _config_from_meta(meta: dict, weights: Weights, path: Path | None, notes: list[str]) -> ModelConfig:
    mc = meta.get("model_config")
    keys = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
    if not isinstance(mc, dict) or any(k not in mc for k in keys):
        raise CheckpointError(f"{path}: meta lacks model_config with {', '.join(keys)}")
    if "window_pattern" not in mc:
        user_pattern = (meta.get("user_config") or {}).get("window_pattern")
        if user_pattern and str(user_pattern).upper() != "L":
            notes.append(
                f"{path.name if path else 'meta'} has no window_pattern; running as 'L' like the "
                f"reference, although training used {user_pattern!r}"
            )
    try:
        return ModelConfig(
            **{k: int(mc[k]) for k in keys},
            window_pattern=str(mc.get("window_pattern", "L")),
            padded_vocab_size=_padded_rows(weights, path),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model_config ({e})") from None


def _config_from_json(
    cfg: dict, weights: Weights, files: CheckpointFiles, tokenizer_size: int, notes: list[str]
) -> tuple[ModelConfig, Detection, dict | None]:
    """config.json of a converted, transformers or mlx-lm folder."""
    ours = cfg.get("nanochat_mlx")
    if ours:
        try:
            config = ModelConfig(**ours["model_config"])
            spec = get_spec(ours["generation"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{files.config}: bad nanochat_mlx section ({e})") from None
        how = "recorded by nanochat-mlx convert" + (f" (source: {ours['how']})" if ours.get("how") else "")
        return config, Detection(spec, how), ours.get("quantization")
    try:
        n_head = int(cfg["num_attention_heads"])
        config = ModelConfig(
            sequence_len=int(cfg.get("max_position_embeddings", 2048)),
            vocab_size=_unpadded_vocab(int(cfg["vocab_size"]), tokenizer_size),
            n_layer=int(cfg["num_hidden_layers"]),
            n_head=n_head,
            n_kv_head=int(cfg.get("num_key_value_heads") or n_head),
            n_embd=int(cfg["hidden_size"]),
            window_pattern=str(cfg.get("window_pattern", "L")),
            padded_vocab_size=_padded_rows(weights, files.config),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{files.config}: missing or bad config key {e}") from None
    detection = detect_generation(weights, config, None, files.origin)
    notes.append(f"{files.layout} folder: run with {detection.spec.name}'s reference math (eps, rotary tables)")
    return config, detection, None
