"""From checkpoint files to canonical weights + architecture spec + tokenizer (no backend yet)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ArchSpec, ModelConfig, get_spec
from .errors import CheckpointError
from .fileio import as_json, read_json, shown
from .sources import CheckpointFiles, resolve
from .tokenizer import Tokenizer
from .weights import Detection, Weights, canonicalize, detect_generation, read_tensors, validate

if TYPE_CHECKING:
    from .hub import Progress

GEOMETRY_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
MAX_SEQUENCE_LEN = 1 << 17  # 131072 positions of training context; rotary tables cover 10x that
MAX_WINDOW_PATTERN = 256  # characters: the pattern tiles over the layers, so only its length is bounded
# model_config fields as transformers' / mlx-lm's config.json names them
_CONFIG_JSON_KEYS = {
    "sequence_len": "max_position_embeddings",
    "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "n_embd": "hidden_size",
    "window_pattern": "window_pattern",
}
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")


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
        """The model's parameters: a quantized matrix counts its values, not its packed words and scales."""
        bits = (self.quantization or {}).get("bits")
        total = 0
        for name, w in self.weights.items():
            base, _, leaf = name.rpartition(".")
            quantized = bits and f"{base}.scales" in self.weights
            if quantized and leaf in ("scales", "biases"):
                continue
            total += int(w.size) * (32 // bits if quantized and leaf == "weight" else 1)
        return total


def read_checkpoint(
    source: str, step: int | None = None, arch: str | None = None, *, progress: Progress | None = None
) -> Checkpoint:
    """Resolve ``source``, read and validate its weights, and decide its generation.

    ``progress(file, done, total)`` reports Hub downloads (default: huggingface_hub's bars on stderr).
    """
    files = resolve(source, step, progress=progress)
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
    _check_layers(config, weights, files.meta or files.config)
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
    data = read_json(Path(path), "meta or config file")
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


def _model_config(
    values: dict[str, Any], path: Path | None, weights: Weights, labels: dict[str, str] | None = None
) -> ModelConfig:
    """A ModelConfig from a file's values, each checked before anything is sized from it.

    The rule: the six geometry fields are positive ints, sequence_len at most MAX_SEQUENCE_LEN
    (the models build rotary tables for 10 x sequence_len positions), window_pattern a string;
    the padded vocab is wte's row count. n_layer is then checked against the weights
    (``_check_layers``) and every shape against the geometry (weights.validate). ``labels`` name
    the fields as the file does, for messages.
    """
    labels = labels or {}

    def label(key: str) -> str:
        return labels.get(key, f"model_config {key}")

    for key in GEOMETRY_KEYS:
        value = values.get(key)
        if type(value) is not int or value < 1:
            raise CheckpointError(f"{path}: {label(key)} must be a positive integer, found {shown(as_json(value))}")
    if values["sequence_len"] > MAX_SEQUENCE_LEN:
        raise CheckpointError(
            f"{path}: {label('sequence_len')} {values['sequence_len']} is above the limit of {MAX_SEQUENCE_LEN}"
        )
    pattern = values.get("window_pattern", "L")
    if not isinstance(pattern, str) or len(pattern) > MAX_WINDOW_PATTERN:
        raise CheckpointError(
            f"{path}: {label('window_pattern')} must be a string of S and L, not {shown(as_json(pattern))}"
        )
    padded = _padded_rows(weights, path)
    try:
        return ModelConfig(
            **{key: values[key] for key in GEOMETRY_KEYS}, window_pattern=pattern, padded_vocab_size=padded
        )
    except CheckpointError as e:  # its consistency checks (divisibility, pattern letters)
        raise CheckpointError(f"{path}: {e}") from None


def _check_layers(config: ModelConfig, weights: Weights, path: Path | None) -> None:
    """n_layer must be the number of layers the weights hold (everything per layer is sized from it)."""
    layers = {int(m.group(1)) for name in weights if (m := _LAYER.match(name))}
    if config.n_layer != len(layers):
        raise CheckpointError(
            f"{path}: n_layer is {config.n_layer} but the weights hold {len(layers)} layers (transformer.h.<i>)"
        )


def _config_from_meta(meta: dict, weights: Weights, path: Path | None, notes: list[str]) -> ModelConfig:
    mc = meta.get("model_config")
    if not isinstance(mc, dict) or any(k not in mc for k in GEOMETRY_KEYS):
        raise CheckpointError(f"{path}: meta lacks model_config with {', '.join(GEOMETRY_KEYS)}")
    if "window_pattern" not in mc:
        user_config = meta.get("user_config")
        user_pattern = user_config.get("window_pattern") if isinstance(user_config, dict) else None
        if user_pattern and str(user_pattern).upper() != "L":
            notes.append(
                f"{path.name if path else 'meta'} has no window_pattern; running as 'L' like the "
                f"reference, although training used {shown(user_pattern)}"
            )
    return _model_config(mc, path, weights)


def _config_from_json(
    cfg: dict, weights: Weights, files: CheckpointFiles, tokenizer_size: int, notes: list[str]
) -> tuple[ModelConfig, Detection, dict | None]:
    """config.json of a converted, transformers or mlx-lm folder."""
    ours = cfg.get("nanochat_mlx")
    if ours:
        if not (isinstance(ours, dict) and isinstance(ours.get("model_config"), dict)):
            raise CheckpointError(f"{files.config}: bad nanochat_mlx section (no model_config object)")
        config = _model_config(ours["model_config"], files.config, weights)
        spec = get_spec(str(ours.get("generation")))
        how = "recorded by nanochat-mlx convert" + (f" (source: {shown(ours['how'])})" if ours.get("how") else "")
        quantization = ours.get("quantization")
        if quantization is not None and not isinstance(quantization, dict):
            raise CheckpointError(f"{files.config}: bad nanochat_mlx quantization (expected an object)")
        return config, Detection(spec, how), quantization
    values = {key: cfg.get(name) for key, name in _CONFIG_JSON_KEYS.items()}
    values["sequence_len"] = cfg.get("max_position_embeddings", 2048)
    values["n_kv_head"] = cfg.get("num_key_value_heads") or values["n_head"]
    values["window_pattern"] = cfg.get("window_pattern", "L")
    if type(values["vocab_size"]) is int:
        values["vocab_size"] = _unpadded_vocab(values["vocab_size"], tokenizer_size)
    config = _model_config(values, files.config, weights, _CONFIG_JSON_KEYS)
    detection = detect_generation(weights, config, None, files.origin)
    notes.append(f"{files.layout} folder: run with {detection.spec.name}'s reference math (eps, rotary tables)")
    return config, detection, None
