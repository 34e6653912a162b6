"""Hostile folders, and the one selection rule: walks never follow link loops and stop at a small
depth, only regular files are read, and a local folder picks the same files as a Hub repo."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import variant_dir
from craft import assert_clean_failure, checkpoint_dir, fixture_state, run_cli

from nanochat_mlx.errors import CheckpointError
from nanochat_mlx.hub import select_files
from nanochat_mlx.sources import MAX_DEPTH, resolve

MODEL = "model_000500.pt"


def self_links(root: Path, n: int = 40) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"link{i}").symlink_to(root, target_is_directory=True)


def test_folder_of_links_to_itself_reports_no_checkpoint(tmp_path: Path) -> None:
    self_links(tmp_path / "loop")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        resolve(str(tmp_path / "loop"))


def test_cli_on_a_folder_of_links_to_itself(tmp_path: Path) -> None:
    """Once 50 s and 1.1 GiB to say "no checkpoint"."""
    self_links(tmp_path / "loop")
    assert_clean_failure(run_cli(tmp_path / "loop"), "no checkpoint found")


def test_links_between_two_folders_are_walked_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "to_b").symlink_to(tmp_path / "b")
    (tmp_path / "b" / "to_a").symlink_to(tmp_path / "a")
    checkpoint_dir(tmp_path / "b" / "ckpt")
    assert resolve(str(tmp_path / "a")).weights[0].name == MODEL


def test_linked_checkpoint_folder_is_found(tmp_path: Path) -> None:
    checkpoint_dir(tmp_path / "real")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine").symlink_to(tmp_path / "real")
    assert resolve(str(tmp_path / "models")).folder == tmp_path / "models" / "mine"


def test_checkpoints_deeper_than_the_limit_are_not_looked_for(tmp_path: Path) -> None:
    deep = tmp_path / "root" / Path(*["sub"] * (MAX_DEPTH + 1))
    checkpoint_dir(deep)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        resolve(str(tmp_path / "root"))
    assert resolve(str(deep.parent)).folder == deep


def replace_with(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        path.unlink()
        make(path)

    return edit


NON_FILES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "model is a FIFO": (MODEL, replace_with(os.mkfifo), "FIFO"),
    "model links to /dev/zero": (MODEL, replace_with(lambda p: p.symlink_to("/dev/zero")), "character device"),
    "tokenizer is a FIFO": ("tokenizer/tokenizer.pkl", replace_with(os.mkfifo), "FIFO"),
    "tokenizer links to /dev/zero": (
        "tokenizer/tokenizer.pkl",
        replace_with(lambda p: p.symlink_to("/dev/zero")),
        "character device",
    ),
}


@pytest.mark.parametrize("case", NON_FILES)
def test_only_regular_files_are_read(case: str, tmp_path: Path) -> None:
    from nanochat_mlx.checkpoint import read_checkpoint

    name, edit, kind = NON_FILES[case]
    folder = checkpoint_dir(tmp_path / "ckpt")
    edit(folder / name)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(folder))
    assert str(err.value) == f"{folder / name}: not a regular file (a {kind})"


# --- one rule for local folders and Hub repos -------------------------------------------------

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def native(dest: Path, variant: str = "g1", safetensors: bool = False, pt: bool = True) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    src = variant_dir(variant)
    shutil.copy(next(src.glob("meta_*.json")), dest)
    if pt:
        shutil.copy(next(src.glob("model_*.pt")), dest)
    if safetensors:
        from safetensors.numpy import save_file

        state = {k: np.asarray(v, np.float32) for k, v in fixture_state(variant).items()}
        save_file(state, str(dest / next(src.glob("model_*.pt")).with_suffix(".safetensors").name))


def tokenizer(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(variant_dir("g1") / "tokenizer" / "tokenizer.pkl", dest)


def multistep(dest: Path) -> None:
    dest.mkdir(parents=True)
    for path in variant_dir("g1-multistep").glob("*_*"):
        shutil.copy(path, dest)


LAYOUTS: dict[str, Callable[[Path], object]] = {
    "pt and safetensors of one step": lambda r: (native(r, safetensors=True), tokenizer(r / "tokenizer")),
    "two depths, tokenizer at the root": lambda r: (native(r / "d20"), native(r / "a" / "b", "g9"), tokenizer(r)),
    "multistep with tokenizer/": lambda r: (multistep(r), tokenizer(r / "tokenizer")),
    "hidden folder skipped": lambda r: (native(r / ".cache"), native(r / "z" / "y"), tokenizer(r)),
}


def hub_snapshot(hub: Path, layout: Callable[[Path], object]) -> None:
    repo = hub / "models--owner--same"
    layout(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_folder_and_hub_repo_pick_the_same_files(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    local = tmp_path / "local" / "repo"
    LAYOUTS[layout](local)
    hub_snapshot(tmp_path / "hub", LAYOUTS[layout])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def picked(files, root: Path) -> list[str]:
        paths = [*files.weights, files.tokenizer, *(p for p in (files.meta, files.config) if p)]
        return sorted(str(p.relative_to(root)) for p in paths)

    from_folder = picked(resolve(str(local)), local)
    from_hub = picked(resolve("hf:owner/same"), tmp_path / "hub" / "models--owner--same" / "snapshots" / COMMIT)
    listing = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert from_folder == from_hub == select_files(listing)
