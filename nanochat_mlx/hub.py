"""Checkpoints from the Hugging Face Hub: the cache first, the network only for what is missing.

Honours ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` as huggingface_hub
does. A cached snapshot that holds the checkpoint the selection rule picks (sources.py) is used
without a request. Otherwise one quick probe (about a second) tells whether the Hub answers, so an
unreachable network fails at once with what to do, instead of huggingface_hub's retries; then only
the selected files are downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointError, NanochatError
from .fileio import one_line, read_bytes

# progress(file name, bytes done, bytes total) as a download goes.
Progress = Callable[[str, int, int], None]

PROBE_TIMEOUT = 1.0  # seconds the Hub has to answer before it counts as unreachable
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def select_files(files: list[str] | set[str], subdir: str = "", step: int | None = None) -> list[str]:
    """The repo files one checkpoint needs ([] when the repo holds none), by the one selection rule."""
    from .sources import select_checkpoint

    selection = select_checkpoint(files, "hub listing", subdir, step)
    return selection.names if selection else []


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit), if any."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    commit = revision if _COMMIT.match(revision) else None
    if commit is None:
        try:
            commit = read_bytes(repo / "refs" / revision, 256, "ref file").decode("ascii", "replace").strip()
        except CheckpointError:  # no such ref (or not a plain file): not cached
            return None
    snapshot = repo / "snapshots" / commit
    return snapshot if _COMMIT.match(commit) and snapshot.is_dir() else None


def download(
    repo_id: str,
    subdir: str = "",
    revision: str | None = None,
    step: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Local folder holding the checkpoint of ``repo_id`` (``subdir`` inside it), fetching what's missing.

    ``progress`` gets (file name, bytes done, bytes total) while files download; without it,
    huggingface_hub draws its progress bars on stderr.
    """
    import huggingface_hub
    from huggingface_hub import constants

    from .sources import list_folder, select_checkpoint

    source = f"hf:{repo_id}" + (f"/{subdir}" if subdir else "") + (f"@{revision}" if revision else "")
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is not None and (snapshot / subdir).is_dir():
        _, rel, names = list_folder(snapshot / subdir)
        try:
            if select_checkpoint(names, source, rel, step) is not None:
                return snapshot / subdir
        except CheckpointError:
            pass  # the cached snapshot lacks part of it: fetch what is missing
    where = "the cached snapshot lacks that checkpoint" if snapshot else "it is not in the Hugging Face cache"
    advice = "use a cached model, or point --source at a local folder (model_<step>.pt, meta_<step>.json, tokenizer)"
    if constants.HF_HUB_OFFLINE:
        raise NanochatError(f"{source}: {where} and HF_HUB_OFFLINE=1 keeps the Hub out of reach; {advice}")
    endpoint = constants.ENDPOINT
    unreachable = _probe(endpoint)
    if unreachable:
        raise NanochatError(
            f"{source}: {where} and the Hub at {endpoint} can't be reached ({unreachable}); {advice} "
            "(HF_HUB_OFFLINE=1 skips the network)"
        )
    files = _repo_files(repo_id, revision, source)
    if subdir and not any(f.startswith(subdir.strip("/") + "/") for f in files):
        raise NanochatError(f"{source}: the repository has no folder {subdir!r}")
    selection = select_checkpoint(files, source, subdir, step)
    if selection is None:
        raise NanochatError(f"{source}: the repository holds no nanochat checkpoint")
    for name in selection.names:
        bar = {"tqdm_class": _progress_bar(progress, name)} if progress else {}
        try:
            path = Path(huggingface_hub.hf_hub_download(repo_id, name, revision=revision, **bar))
        except Exception as e:  # noqa: BLE001 - an HTTP, network or disk error: one line for the user
            raise NanochatError(f"{source}: downloading {name} failed ({_why(e)})") from None
    return path.parents[name.count("/")] / subdir  # the snapshot folder holding the last file


def _probe(endpoint: str) -> str | None:
    """None when the Hub answers within PROBE_TIMEOUT (any HTTP status), else why it didn't."""
    from huggingface_hub.utils import get_session

    try:
        get_session().request("HEAD", endpoint, timeout=PROBE_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - whatever the HTTP client raises, the Hub is out of reach
        return _why(e)
    return None


def _why(e: Exception) -> str:
    return one_line(f"{type(e).__name__}: {e}", 160)


def _repo_files(repo_id: str, revision: str | None, source: str) -> list[str]:
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision)
    except errors.RepositoryNotFoundError:
        raise NanochatError(f"{source}: no such repository on the Hugging Face Hub (or it is private)") from None
    except errors.RevisionNotFoundError:
        raise NanochatError(f"{source}: the repository has no revision {revision!r}") from None
    except Exception as e:  # noqa: BLE001 - an HTTP or network error: one line for the user
        raise NanochatError(f"{source}: listing the repository failed ({_why(e)})") from None


def _progress_bar(progress: Progress, name: str) -> type:
    """A stand-in for tqdm, for huggingface_hub's ``tqdm_class`` hook, that reports to ``progress``.

    It has the methods huggingface_hub calls on its own aggregating bar (plain and Xet downloads).
    """

    class Bar:
        def __init__(self, *_args: Any, total: int | None = None, initial: int = 0, **_kwargs: Any) -> None:
            self.total, self.n = total, int(initial or 0)
            progress(name, self.n, int(self.total or 0))

        def update(self, n: int | float | None = 1) -> None:
            self.n += int(n or 0)
            progress(name, self.n, int(self.total or 0))

        def update_transfer(self, n: int | float | None = 1) -> None:
            pass  # network bytes; the bytes written (update) are what the file's progress is

        def set_postfix_str(self, *_args: Any, **_kwargs: Any) -> None:
            pass

        set_transfer_postfix_str = set_postfix_str

        def close(self) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *_exc: Any) -> None:
            pass

    return Bar
