"""Resolve a source string to the files of one checkpoint (``CheckpointFiles``).

Sources: ``demo`` (the built-in model), a local folder (native nanochat, transformers, mlx-lm or
our converted layout), a native model file, ``nanochat:<phase>[/<tag>]`` (the reference's base dir) and
``hf:owner/name[/subdir][@revision]`` (downloaded through huggingface_hub, only the files needed).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, NanochatError
from .fileio import read_json

if TYPE_CHECKING:
    from .hub import Progress


_MODEL = re.compile(r"^model(?:_(\d+))?\.(pt|safetensors)$")
_META = re.compile(r"^meta_(\d+)\.json$")
MAX_DEPTH = 3  # checkpoint folders are looked for at most this many levels below the source
_TOKENIZER_LEVELS = 3  # a local folder's listing reaches this many folders above it (base dir tokenizer/)
PHASE_DIRS = {
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


def resolve(source: str, step: int | None = None, *, progress: Progress | None = None) -> CheckpointFiles:
    """Find the checkpoint files behind ``source`` (``progress`` reports Hub downloads)."""
    if source == "demo":
        from .demo import demo_files

        return demo_files(step)
    if source.startswith("hf:"):
        return _resolve_hub(source[3:], step, progress)
    if source.startswith("nanochat:"):
        return _resolve_base_dir(source[len("nanochat:") :], step)
    path = Path(source).expanduser()
    if path.is_dir():
        return resolve_folder(path, step, origin=source)
    if os.path.lexists(path):
        m = _MODEL.match(path.name)
        if not m:
            raise CheckpointError(f"{source}: expected a folder or a model_<step>.pt / model.pt file")
        return resolve_folder(path.parent, int(m.group(1)) if m.group(1) else None, origin=source, model=path.name)
    raise NanochatError(f"{source}: no such file or folder (sources: a folder, hf:owner/name, nanochat:sft)")


# --- the one selection rule, for local folders and Hub repos alike --------------------------


@dataclass(frozen=True)
class Selection:
    """The files of one checkpoint, as ``/``-separated names relative to the listing's root."""

    folder: str
    weights: tuple[str, ...]
    tokenizer: str
    meta: str | None = None
    config: str | None = None
    step: int | None = None
    others: tuple[str, ...] = ()  # other checkpoint folders as shallow as the one chosen

    @property
    def names(self) -> list[str]:
        return sorted({*self.weights, self.tokenizer, *(n for n in (self.meta, self.config) if n)})


def select_checkpoint(
    files: Iterable[str], origin: str, subdir: str = "", step: int | None = None, model: str | None = None
) -> Selection | None:
    """THE rule that picks a checkpoint's files from a listing: a local folder's or a Hub repo's.

    - The checkpoint folder is the shallowest folder at or below ``subdir`` (at most
      ``MAX_DEPTH`` levels down, hidden folders skipped; ties: the largest ``d<N>`` model tag, as
      the reference picks, else by name) that holds config.json
      with ``*.safetensors``, or native model files ``model_<step>.{pt,safetensors}`` / ``model.*``.
    - config.json + ``*.safetensors``: config.json and every shard. Native: the file ``model`` if
      given, else the ``step`` asked for, else the highest step, else the unnumbered model; for one
      step, .safetensors before .pt (it needs no pickle); with its ``meta_<step>.json`` / meta.json.
    - The tokenizer (tokenizer.pkl, tokenizer.json, tiktoken/tokenizer.model) beside the model or in
      its tokenizer/ folder, else in the nearest folder above that has one, up to the listing's root.

    None when no folder holds a checkpoint; a checkpoint that lacks its step, meta or tokenizer
    is an error naming what is missing.
    """
    files = set(files)
    prefix = subdir.strip("/") + "/" if subdir.strip("/") else ""
    by_dir: dict[str, set[str]] = {}
    for name in files:
        folder, _, base = name.rpartition("/")
        by_dir.setdefault(folder, set()).add(base)

    def depth(folder: str) -> int | None:
        """Levels below ``subdir``, or None for folders outside it, hidden or too deep."""
        if (folder + "/").startswith(prefix):
            rel = (folder + "/")[len(prefix) :].strip("/")
            parts = rel.split("/") if rel else []
            if len(parts) <= MAX_DEPTH and not any(p.startswith(".") for p in parts):
                return len(parts)
        return None

    found = [(d, f) for f in by_dir if (d := depth(f)) is not None and _holds_checkpoint(by_dir[f], model)]
    if not found:
        return None
    shallowest = min(d for d, _ in found)
    tied = sorted(f for d, f in found if d == shallowest)
    folder = max(tied, key=_model_size) if all(_model_size(f) for f in tied) else tied[0]
    others = tuple(f for f in tied if f != folder)
    names = by_dir[folder]

    def rel(name: str) -> str:
        return posixpath.join(folder, name) if folder else name

    tokenizer = _nearest_tokenizer(files, folder)
    shown_folder = (folder + "/")[len(prefix) :] if folder else ""  # as the user sees it from the source
    shown_folder = shown_folder or "the folder"
    if tokenizer is None:
        raise CheckpointError(
            f"{origin}: no tokenizer for the checkpoint in {shown_folder} (looked for tokenizer.pkl, "
            "tokenizer.json or tiktoken/tokenizer.model beside it, in tokenizer/, and in the folders above)"
        )
    if model is None and _has_config_weights(names):
        shards = tuple(rel(n) for n in sorted(names) if n.endswith(".safetensors"))
        return Selection(folder, shards, tokenizer, config=rel("config.json"), others=others)
    models: dict[int | None, str] = {}
    for name in sorted(names):  # ".pt" sorts before ".safetensors": the latter wins a step
        if (m := _MODEL.match(name)) and model in (None, name):
            models[int(m.group(1)) if m.group(1) else None] = name
    numbered = sorted(k for k in models if k is not None)
    if step is not None and step not in models:
        have = ", ".join(str(s) for s in numbered) or "none"
        raise CheckpointError(f"{origin}: no checkpoint for step {step} in {shown_folder} (steps present: {have})")
    chosen = step if step is not None else (numbered[-1] if numbered else None)
    meta = _meta_name(names, chosen)
    if meta is None:
        want = f"meta_{chosen:06d}.json" if chosen is not None else "meta.json"
        raise CheckpointError(
            f"{origin}: {models[chosen]} in {shown_folder} has no meta file {want} beside it (it holds model_config)"
        )
    return Selection(folder, (rel(models[chosen]),), tokenizer, meta=rel(meta), step=chosen, others=others)


def _model_size(folder: str) -> int | None:
    """N of a ``d<N>`` model-tag folder (the reference names its runs by depth), else None."""
    m = re.fullmatch(r"d(\d+)", posixpath.basename(folder))
    return int(m.group(1)) if m else None


def _holds_checkpoint(names: set[str], model: str | None) -> bool:
    if model is not None:
        return model in names
    return _has_config_weights(names) or any(_MODEL.match(n) for n in names)


def _has_config_weights(names: set[str]) -> bool:
    return "config.json" in names and any(n.endswith(".safetensors") for n in names)


def _meta_name(names: set[str], step: int | None) -> str | None:
    if step is None:
        return "meta.json" if "meta.json" in names else None
    return next((n for n in sorted(names) if (m := _META.match(n)) and int(m.group(1)) == step), None)


def _nearest_tokenizer(files: set[str], folder: str) -> str | None:
    parts = folder.split("/") if folder else []
    for depth in range(len(parts), -1, -1):
        base = "/".join(parts[:depth])
        for sub in ("", "tokenizer/"):
            for name in _TOKENIZER_FILES:
                path = posixpath.join(base, sub + name) if base else sub + name
                if path in files:
                    return path
    return None


# --- local folders ----------------------------------------------------------------------------


def list_folder(path: Path, model: str | None = None) -> tuple[Path, str, list[str]]:
    """A local folder as a listing for :func:`select_checkpoint`: (root, the folder's place, names).

    The names are the non-folder entries under ``path`` as deep as the rule can look (``_walk``),
    each real folder walked once whatever links lead to it, and the tokenizer candidates of the
    ``_TOKENIZER_LEVELS`` folders above, where a nanochat base dir keeps tokenizer/. The root is the
    highest of those folders.
    """
    root, above = path, []
    for _ in range(_TOKENIZER_LEVELS):
        if root.parent == root:
            break
        above.insert(0, root.name)
        root = root.parent
    subdir = "/".join(above)
    names = [posixpath.join(subdir, n) if subdir else n for n in _walk(path, model)]
    for depth in range(len(above)):
        base = "/".join(above[:depth])
        for sub in ("", "tokenizer/"):
            for name in _TOKENIZER_FILES:
                rel = posixpath.join(base, sub + name) if base else sub + name
                if os.path.lexists(root / rel) and not (root / rel).is_dir():
                    names.append(rel)
    return root, subdir, names


def _walk(top: Path, model: str | None) -> list[str]:
    """Relative names of the non-folder entries under ``top``, breadth first, each real folder once.

    Down to MAX_DEPTH levels, and once a level holds a checkpoint folder (which the rule will pick
    from that level), only two levels further: its tokenizer/ and tokenizer/tiktoken/ folders.
    """
    seen: set[tuple[int, int]] = set()
    out: list[str] = []
    level, last = [(top, "")], MAX_DEPTH + 2
    for depth in range(MAX_DEPTH + 3):
        if depth > last:
            break
        below = []
        for folder, rel in level:
            try:
                st = folder.stat()
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            here = set()
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    here.add(entry.name)
                    out.append(rel + entry.name)
                elif not entry.name.startswith("."):
                    below.append((Path(entry.path), rel + entry.name + "/"))
            if depth <= MAX_DEPTH and _holds_checkpoint(here, model):
                last = min(last, depth + 2)
        level = below
    return out


def resolve_folder(path: Path, step: int | None, origin: str, model: str | None = None) -> CheckpointFiles:
    root, subdir, names = list_folder(path, model)
    selection = select_checkpoint(names, origin, subdir, step, model)
    if selection is None:
        raise CheckpointError(
            f"{origin}: no checkpoint found (looked for model_<step>.pt, model.pt, *.safetensors with "
            f"config.json, in the folder and {MAX_DEPTH} levels of subfolders)"
        )
    return _checkpoint_files(root, selection, origin)


def _checkpoint_files(root: Path, sel: Selection, origin: str) -> CheckpointFiles:
    weights = [root / n for n in sel.weights]
    tokenizer = root / sel.tokenizer
    notes = [_choice_note(origin, sel)] if sel.others else []
    if sel.config is None:
        return CheckpointFiles(origin, "native", weights, tokenizer, meta=root / sel.meta, step=sel.step, notes=notes)
    config_path = root / sel.config
    config = read_json(config_path, "config.json")
    if isinstance(config, dict) and "nanochat_mlx" in config:
        layout = "converted"
    elif _has_transformers_names(weights[0]):
        layout = "transformers"
    else:
        layout = "mlx-lm"
    return CheckpointFiles(origin, layout, weights, tokenizer, config=config_path, notes=notes)


def _choice_note(origin: str, sel: Selection) -> str:
    """Several checkpoints side by side: which one runs, and how to name another."""
    shown = ", ".join(posixpath.basename(f) for f in sel.others[:4]) + (", ..." if len(sel.others) > 4 else "")
    return (
        f"{origin} holds {len(sel.others) + 1} checkpoint folders: running {posixpath.basename(sel.folder)} "
        f"(the others: {shown}; give its folder to run another)"
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
    if phase not in PHASE_DIRS:
        raise NanochatError(f"nanochat:{spec}: unknown phase {phase!r} (choose {', '.join(PHASE_DIRS)})")
    phase_dir = nanochat_base_dir() / PHASE_DIRS[phase]
    if not phase_dir.is_dir():
        raise CheckpointError(f"nanochat:{spec}: {phase_dir} does not exist (set NANOCHAT_BASE_DIR?)")
    tag = tag or _largest_model_tag(phase_dir, spec)
    folder = phase_dir / tag
    if not folder.is_dir():
        raise CheckpointError(f"nanochat:{spec}: no model tag {tag!r} in {phase_dir}")
    return resolve_folder(folder, step, origin=f"nanochat:{spec}")


def base_dir_source(spec: str) -> str:
    """``nanochat:PHASE`` as the ``nanochat:PHASE/TAG`` it runs (other sources unchanged)."""
    phase, _, tag = spec.removeprefix("nanochat:").partition("/")
    phase_dir = nanochat_base_dir() / PHASE_DIRS.get(phase, "")
    if not spec.startswith("nanochat:") or tag or phase not in PHASE_DIRS or not phase_dir.is_dir():
        return spec
    try:
        return f"nanochat:{phase}/{_largest_model_tag(phase_dir, spec)}"
    except CheckpointError:
        return spec


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


def _resolve_hub(spec: str, step: int | None, progress: Progress | None) -> CheckpointFiles:
    from .hub import download

    repo_id, subdir, revision = parse_hub_spec(spec)
    folder = download(repo_id, subdir=subdir, revision=revision, step=step, progress=progress)
    return resolve_folder(folder, step, origin=f"hf:{spec}")


def parse_hub_spec(spec: str) -> tuple[str, str, str | None]:
    """``owner/name[/subdir][@revision]`` -> (repo_id, subdir, revision)."""
    spec, at, revision = spec.partition("@")
    parts = [p for p in spec.split("/") if p]
    if len(parts) < 2 or (at and not revision.strip()):
        raise NanochatError(f"hf:{spec}{at}{revision}: expected hf:owner/name[/subdir][@revision]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None
