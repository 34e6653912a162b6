"""Model discovery: the demo, the Hugging Face cache, the nanochat base dir, folders, known repos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, variant_dir
from test_sources import COMMIT, build_hf_cache, native_files

from nanochat_mlx import models
from nanochat_mlx.sources import resolve


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache holding owner/name (checkpoints d12, d20 and archive/old)."""
    import huggingface_hub.constants

    hub = tmp_path / "hf" / "hub"
    build_hf_cache(hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub


def build_base_dir(base: Path) -> Path:
    """A nanochat base dir: base_checkpoints/d4 and d12, chatsft_checkpoints/d20, a shared tokenizer/."""
    native_files("g1", base / "base_checkpoints" / "d12")
    native_files("g1", base / "base_checkpoints" / "d4")
    native_files("g9", base / "chatsft_checkpoints" / "d20")
    (base / "mid_checkpoints" / "empty").mkdir(parents=True)  # a tag folder without a model
    shutil.copytree(variant_dir("g1") / "tokenizer", base / "tokenizer")
    return base


@pytest.fixture
def base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = build_base_dir(tmp_path / "nanochat")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


def sources(choices: list[models.ModelChoice], group: str) -> list[str]:
    return [c.source for c in choices if c.group == group]


def test_hub_cache_lists_every_checkpoint_folder(hub: Path) -> None:
    found = models.hub_cache_choices()
    assert [c.source for c in found] == ["hf:owner/name/archive/old", "hf:owner/name/d12", "hf:owner/name/d20"]
    assert all(c.size_bytes and c.size_bytes > 0 and "step 500" in c.detail for c in found)


def test_hub_cache_sources_resolve_offline(hub: Path) -> None:
    for choice in models.hub_cache_choices():
        files = resolve(choice.source)
        assert COMMIT in str(files.folder) and files.layout == "native"


def test_hub_cache_skips_repos_without_a_checkpoint(hub: Path) -> None:
    snap = hub / "models--someone--dataset-like" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("no model here")
    (hub / "models--someone--dataset-like" / "refs").mkdir()
    (hub / "models--someone--dataset-like" / "refs" / "main").write_text(COMMIT)
    assert not any("someone" in c.source for c in models.hub_cache_choices())


def test_missing_hub_cache_lists_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "no-cache"))
    assert models.hub_cache_choices() == []


def test_cached_known_repo_is_not_offered_for_download(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(hub / "models--owner--name", hub / "models--karpathy--nanochat-d32")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(hub / "none"))
    choices = models.discover()
    assert "hf:karpathy/nanochat-d32/d12" in sources(choices, "hub-cache")
    assert "hf:karpathy/nanochat-d32" not in sources(choices, "download")
    assert "hf:Antigma/nanochat-d32" in sources(choices, "download")


def test_base_dir_lists_each_phase_and_tag(base_dir: Path) -> None:
    found = models.base_dir_choices()
    assert [c.source for c in found] == ["nanochat:base/d4", "nanochat:base/d12", "nanochat:sft/d20"]
    assert all("n_layer" in c.detail for c in found)


def test_base_dir_sources_resolve(base_dir: Path) -> None:
    for choice in models.base_dir_choices():
        assert resolve(choice.source).tokenizer == base_dir / "tokenizer" / "tokenizer.pkl"


def test_folder_given_is_described(tmp_path: Path) -> None:
    folder = native_files("g1", tmp_path / "mine", tokenizer=True)
    choice = models.folder_choice(str(folder))
    assert choice.problem is None and "native layout, step 500" in choice.detail


def test_folder_that_is_no_checkpoint_says_why(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    choice = models.folder_choice(str(tmp_path / "empty"))
    assert choice.problem and "no checkpoint found" in choice.problem


def test_known_repos_come_with_estimated_sizes() -> None:
    offered = [models.download_choice(k) for k in models.KNOWN_REPOS]
    assert {"hf:karpathy/nanochat-d32", "hf:Antigma/nanochat-d32"} <= {c.source for c in offered}
    assert all(c.size_bytes > 1e9 and not c.downloaded for c in offered)
    assert "~" in models.render(offered)


def test_discover_orders_groups_and_marks_the_last_used(hub: Path, base_dir: Path) -> None:
    choices = models.discover(last="nanochat:sft/d20")
    order = [c.group for c in choices]
    assert order == sorted(order, key=list(models.GROUPS).index)
    assert choices[0].source == "demo"
    assert [c.source for c in choices if c.last_used] == ["nanochat:sft/d20"]


def test_a_phase_chosen_last_marks_the_tag_it_runs(base_dir: Path) -> None:
    marked = [c.source for c in models.discover(last="nanochat:base") if c.last_used]
    assert marked == ["nanochat:base/d12"]  # the largest tag, as nanochat:base loads


def test_a_folder_chosen_last_is_listed_and_marked_without_being_given(tmp_path: Path) -> None:
    folder = native_files("g1", tmp_path / "my-run", tokenizer=True)
    marked = [c for c in models.discover(last=str(folder)) if c.last_used]
    assert [(c.source, c.group) for c in marked] == [(str(folder), "folder")]


def test_a_folder_given_relative_is_the_one_chosen_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = native_files("g1", tmp_path / "my-run", tokenizer=True)
    monkeypatch.chdir(tmp_path)
    listed = [c for c in models.discover(["my-run"], last=str(folder)) if c.group == "folder"]
    assert [(c.source, c.last_used) for c in listed] == [("my-run", True)]


def _env(tmp_path: Path) -> dict[str, str]:
    build_hf_cache(tmp_path / "hf" / "hub")
    build_base_dir(tmp_path / "nanochat")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NANOCHAT"))}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        NANOCHAT_BASE_DIR=str(tmp_path / "nanochat"),
        NANOCHAT_MLX_CONFIG_DIR=str(tmp_path / "config"),
    )
    return env


def test_models_command_lists_all_groups(tmp_path: Path) -> None:
    env = _env(tmp_path)
    folder = native_files("g1", tmp_path / "mine", tokenizer=True)
    cmd = [sys.executable, "-m", "nanochat_mlx.cli", "models", str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for expected in ("demo", "hf:owner/name/d12", "nanochat:sft/d20", str(folder), "hf:karpathy/nanochat-d32"):
        assert expected in out.stdout


def test_models_command_json_marks_the_remembered_choice(tmp_path: Path) -> None:
    env = _env(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps({"last_source": "hf:owner/name/d20"}))
    cmd = [sys.executable, "-m", "nanochat_mlx.cli", "models", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["source"] for r in rows if r["last_used"]] == ["hf:owner/name/d20"]
    assert {r["group"] for r in rows} == set(models.GROUPS) - {"folder"}


def test_models_command_fails_for_a_bad_folder(tmp_path: Path) -> None:
    env = _env(tmp_path)
    cmd = [sys.executable, "-m", "nanochat_mlx.cli", "models", str(tmp_path / "nope")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 1 and "no such file or folder" in out.stdout
