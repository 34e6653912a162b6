"""Resolve a source string to the files of one checkpoint (``CheckpointFiles``).

Sources: ``demo`` (the built-in model), a local folder (native nanochat, transformers, mlx-lm or
our converted layout), a native model file, ``nanochat:<phase>[/<tag>]`` (the reference's base dir) and
``hf:owner/name[/subdir][@revision]`` (downloaded through huggingface_hub, only the files needed).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, NanochatError

DEFAULT_SOURCE = "hf:Antigma/nanochat-d32"

_NATIVE_MODEL = re.compile(r"^model(?:_(\d+))?\.(pt|safetensors)$")
_PHASE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
_TOKENIZER_FILES = ("tokenizer.pkl", "tokenizer.json", "tiktoken/tokenizer.model")


@dataclass
class CheckpointFiles:
    """Which files make up one checkpoint, and how they are laid out."""

    origin: str  # what the user asked for, for messages
    layout: str  # "native", "transformers", "mlx-lm" or "converted"
    weights: list[Path]
    tokenizer: Path
    meta: Path | None = None  # native meta_<step>.json
    config: Path | None = None  # config.json of the other layouts
    step: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.weights[0].parent


def resolve(source: str, step: int | None = None) -> CheckpointFiles:
    """Find the checkpoint files behind ``source``."""
    if source == "demo":
        from .demo import demo_files

        return demo_files(step)
    if source.startswith("hf:"):
        return _resolve_hub(source[3:], step)
    if source.startswith("nanochat:"):
        return _resolve_base_dir(source[len("nanochat:") :], step)
    path = Path(source).expanduser()
    if path.is_file():
        return _resolve_native(path.parent, step, origin=source, model_file=path)
    if not path.is_dir():
        raise NanochatError(f"{source}: no such file or folder (sources: a folder, hf:owner/name, nanochat:sft)")
    return _resolve_dir(path, step, origin=source)


# --- local folders ----------------------------------------------------------------------------


def _is_checkpoint_dir(path: Path) -> bool:
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return True
    return any(_NATIVE_MODEL.match(p.name) for p in path.iterdir() if p.is_file())


def _resolve_dir(path: Path, step: int | None, origin: str) -> CheckpointFiles:
    folder = _shallowest_checkpoint_dir(path)
    if folder is None:
        raise CheckpointError(
            f"{origin}: no checkpoint found (looked for model_<step>.pt, model.pt, *.safetensors with "
            "config.json, in the folder and its subfolders)"
        )
    config_path = folder / "config.json"
    if config_path.is_file() and any(folder.glob("*.safetensors")):
        return _resolve_config_dir(folder, origin)
    return _resolve_native(folder, step, origin)


def _shallowest_checkpoint_dir(root: Path, max_depth: int = 3) -> Path | None:
    level = [root]
    for _ in range(max_depth + 1):
        found = sorted(d for d in level if _is_checkpoint_dir(d))
        if found:
            return found[0]
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    return None


def _resolve_native(folder: Path, step: int | None, origin: str, model_file: Path | None = None) -> CheckpointFiles:
    candidates: dict[int | None, Path] = {}
    for p in folder.iterdir():
        m = _NATIVE_MODEL.match(p.name)
        if m and p.is_file():
            key = int(m.group(1)) if m.group(1) is not None else None
            if key not in candidates or p.suffix == ".pt":
                candidates[key] = p
    if model_file is not None:
        m = _NATIVE_MODEL.match(model_file.name)
        if not m:
            raise CheckpointError(f"{model_file}: expected a model_<step>.pt or model.pt file")
        step = int(m.group(1)) if m.group(1) is not None else None
    numbered = sorted(k for k in candidates if k is not None)
    if step is None:
        chosen = numbered[-1] if numbered else None
    elif step not in candidates:
        have = ", ".join(str(s) for s in numbered) or "none"
        raise CheckpointError(f"{origin}: no checkpoint for step {step} (steps present: {have})")
    else:
        chosen = step
    if chosen not in candidates:
        raise CheckpointError(f"{origin}: no model_<step>.pt or model.pt in {folder}")
    model = candidates[chosen]
    meta = _find_meta(folder, chosen)
    if meta is None:
        want = f"meta_{chosen:06d}.json" if chosen is not None else "meta.json"
        raise CheckpointError(f"{model}: missing its meta file {want} (holds model_config) in {folder}")
    return CheckpointFiles(
        origin=origin,
        layout="native",
        weights=[model],
        tokenizer=_find_tokenizer(folder, origin),
        meta=meta,
        step=chosen,
    )


def _find_meta(folder: Path, step: int | None) -> Path | None:
    if step is None:
        return folder / "meta.json" if (folder / "meta.json").is_file() else None
    for p in folder.glob("meta_*.json"):
        m = re.fullmatch(r"meta_(\d+)\.json", p.name)
        if m and int(m.group(1)) == step:
            return p
    return None


def _find_tokenizer(folder: Path, origin: str, levels: int = 3) -> Path:
    """tokenizer.pkl (or tokenizer.json) beside the model, in tokenizer/, or up the base dir."""
    for base in [folder, *list(folder.parents)[:levels]]:
        for sub in ("", "tokenizer/"):
            for name in _TOKENIZER_FILES:
                if (base / sub / name).is_file():
                    return base / sub / name
    raise CheckpointError(
        f"{origin}: no tokenizer found (looked for tokenizer.pkl beside the model, in tokenizer/, "
        f"and in the nanochat base dir's tokenizer/ above {folder})"
    )


def _resolve_config_dir(folder: Path, origin: str) -> CheckpointFiles:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    shards = sorted(folder.glob("*.safetensors"))
    if "nanochat_mlx" in config:
        layout = "converted"
    elif any(_has_transformers_names(p) for p in shards[:1]):
        layout = "transformers"
    else:
        layout = "mlx-lm"
    return CheckpointFiles(
        origin=origin, layout=layout, weights=shards, tokenizer=_find_tokenizer(folder, origin), config=config_path
    )


def _has_transformers_names(path: Path) -> bool:
    from .weights import read_safetensors

    return any(name.startswith("model.") for name in read_safetensors(path))


# --- the reference's base dir -----------------------------------------------------------------


def nanochat_base_dir() -> Path:
    """``$NANOCHAT_BASE_DIR`` if set and non-empty, else ``~/.cache/nanochat`` (as the reference)."""
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def _resolve_base_dir(spec: str, step: int | None) -> CheckpointFiles:
    phase, _, tag = spec.partition("/")
    if phase not in _PHASE_DIRS:
        raise NanochatError(f"nanochat:{spec}: unknown phase {phase!r} (choose {', '.join(_PHASE_DIRS)})")
    phase_dir = nanochat_base_dir() / _PHASE_DIRS[phase]
    if not phase_dir.is_dir():
        raise CheckpointError(f"nanochat:{spec}: {phase_dir} does not exist (set NANOCHAT_BASE_DIR?)")
    if not tag:
        tag = _largest_model_tag(phase_dir, spec)
    folder = phase_dir / tag
    if not folder.is_dir():
        raise CheckpointError(f"nanochat:{spec}: no model tag {tag!r} in {phase_dir}")
    return _resolve_native(folder, step, origin=f"nanochat:{spec}")


def _largest_model_tag(phase_dir: Path, spec: str) -> str:
    """The reference's rule: the largest d<N> tag, else the most recently modified folder."""
    tags = [d for d in phase_dir.iterdir() if d.is_dir()]
    if not tags:
        raise CheckpointError(f"nanochat:{spec}: {phase_dir} holds no model folders")
    depths = [(int(m.group(1)), d.name) for d in tags if (m := re.match(r"d(\d+)", d.name))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda d: d.stat().st_mtime).name


# --- Hugging Face Hub -------------------------------------------------------------------------


def _resolve_hub(spec: str, step: int | None) -> CheckpointFiles:
    from .hub import download

    repo_id, subdir, revision = parse_hub_spec(spec)
    folder = download(repo_id, subdir=subdir, revision=revision, step=step)
    return _resolve_dir(folder, step, origin=f"hf:{spec}")


def parse_hub_spec(spec: str) -> tuple[str, str, str | None]:
    """``owner/name[/subdir][@revision]`` -> (repo_id, subdir, revision)."""
    spec, _, revision = spec.partition("@")
    parts = [p for p in spec.split("/") if p]
    if len(parts) < 2:
        raise NanochatError(f"hf:{spec}: expected hf:owner/name[/subdir][@revision]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None
