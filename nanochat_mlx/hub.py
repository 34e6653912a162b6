"""Download just the files of one checkpoint from the Hugging Face Hub (huggingface_hub).

Honours ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` as huggingface_hub does; when the
Hub can't be reached, the cached snapshot is used, and if there is none the error says how to
point ``--source`` at a local folder instead.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from .errors import NanochatError

_MODEL = re.compile(r"^model(?:_(\d+))?\.(pt|safetensors)$")
_TOKENIZERS = ("tokenizer.pkl", "tokenizer.json", "tiktoken/tokenizer.model")


def select_files(files: list[str] | set[str], subdir: str = "", step: int | None = None) -> list[str]:
    """The repo files one checkpoint needs, from the shallowest checkpoint folder under ``subdir``."""
    prefix = subdir.strip("/") + "/" if subdir.strip("/") else ""
    present = {f for f in files if f.startswith(prefix)}
    files = set(files)
    by_dir: dict[str, list[str]] = {}
    for f in sorted(present):
        by_dir.setdefault(posixpath.dirname(f), []).append(posixpath.basename(f))

    def has_config_weights(names: list[str]) -> bool:
        return "config.json" in names and any(n.endswith(".safetensors") for n in names)

    candidates = [d for d, names in by_dir.items() if has_config_weights(names) or any(map(_MODEL.match, names))]
    if not candidates:
        return []
    folder = min(candidates, key=lambda d: (d.count("/") + bool(d), d))
    names = by_dir[folder]
    if has_config_weights(names):
        chosen = ["config.json", *(n for n in names if n.endswith(".safetensors"))]
    else:
        steps = {int(m.group(1)) if m.group(1) else None: n for n in names if (m := _MODEL.match(n))}
        numbered = sorted(s for s in steps if s is not None)
        want = step if step is not None else (numbered[-1] if numbered else None)
        meta = "meta.json" if want is None else next((n for n in names if _is_meta_of(n, want)), None)
        chosen = [n for n in (steps.get(want), meta) if n]
    picked = {posixpath.join(folder, n) for n in chosen}
    # The tokenizer: beside the model, in tokenizer/, or in any folder above (the repo root included).
    parts = folder.split("/") if folder else []
    for depth in range(len(parts), -1, -1):
        base = "/".join(parts[:depth])
        for name in _TOKENIZERS:
            for path in (posixpath.join(base, name), posixpath.join(base, "tokenizer", name)):
                if path in files:
                    picked.add(path)
    return sorted(picked)


def _is_meta_of(name: str, step: int) -> bool:
    m = re.fullmatch(r"meta_(\d+)\.json", name)
    return bool(m) and int(m.group(1)) == step


def download(repo_id: str, subdir: str = "", revision: str | None = None, step: int | None = None) -> Path:
    """Local folder holding the checkpoint of ``repo_id`` (downloading what's missing)."""
    import huggingface_hub
    from huggingface_hub import HfApi, snapshot_download

    source = f"hf:{repo_id}" + (f"/{subdir}" if subdir else "") + (f"@{revision}" if revision else "")
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    path: str | None = None
    if not offline:
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except huggingface_hub.errors.RepositoryNotFoundError:
            raise NanochatError(f"{source}: no such repository on the Hugging Face Hub (or it is private)") from None
        except huggingface_hub.errors.RevisionNotFoundError:
            raise NanochatError(f"{source}: the repository has no revision {revision!r}") from None
        except Exception:  # no network: fall back to the cache below
            files = None
        if files is not None:
            patterns = select_files(files, subdir, step)
            if not any(_MODEL.match(posixpath.basename(p)) or p.endswith(".safetensors") for p in patterns):
                wanted = f" for step {step}" if step is not None else ""
                raise NanochatError(f"{source}: the repository holds no nanochat checkpoint{wanted}")
            path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    if path is None:
        try:
            path = snapshot_download(repo_id, revision=revision, local_files_only=True)
        except Exception:
            raise NanochatError(
                f"{source}: not in the Hugging Face cache and the Hub can't be reached "
                "(offline or HF_HUB_OFFLINE=1). Download it when online, or point --source at a "
                "local folder with model_<step>.pt, meta_<step>.json and tokenizer.pkl"
            ) from None
    folder = Path(path) / subdir
    if not folder.is_dir():
        raise NanochatError(f"{source}: the repository has no folder {subdir!r}")
    return folder
