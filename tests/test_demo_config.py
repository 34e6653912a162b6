"""The remembered model choice: the demo by default, the last choice after one, robust to bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from nanochat_mlx import userconfig


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NANOCHAT_MLX_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config" / "config.json"


def test_default_is_the_demo_without_a_config_file(config: Path) -> None:
    assert not config.exists()
    assert userconfig.default_source() == "demo"


def test_remembered_source_becomes_the_default(config: Path) -> None:
    assert userconfig.remember_source("hf:karpathy/nanochat-d32")
    assert userconfig.default_source() == "hf:karpathy/nanochat-d32"
    assert json.loads(config.read_text()) == {"last_source": "hf:karpathy/nanochat-d32"}


def test_local_folder_is_remembered_absolute(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    userconfig.remember_source("ckpt")
    monkeypatch.chdir("/")
    assert userconfig.default_source() == str(tmp_path / "ckpt")


def test_deleted_folder_falls_back_to_the_demo(config: Path, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    userconfig.remember_source(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt").rmdir()
    assert userconfig.default_source() == "demo"


@pytest.mark.parametrize(
    "text", ["{not json", "", "[1, 2]", '{"last_source": 3}', '{"last_source": "  "}', "\x00\xff", "[" * 100_000]
)
def test_corrupt_or_hand_mangled_file_counts_as_empty(config: Path, text: str) -> None:
    config.parent.mkdir(parents=True)
    config.write_text(text, encoding="latin-1")
    assert userconfig.default_source() == "demo"


def test_remembering_replaces_a_corrupt_file(config: Path) -> None:
    config.parent.mkdir(parents=True)
    config.write_text("{not json")
    assert userconfig.remember_source("nanochat:sft/d20")
    assert userconfig.default_source() == "nanochat:sft/d20"


def test_other_settings_are_kept(config: Path) -> None:
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"theme": "dark", "last_source": "demo"}))
    userconfig.remember_source("hf:owner/name")
    assert json.loads(config.read_text()) == {"theme": "dark", "last_source": "hf:owner/name"}


def test_write_is_atomic_and_leaves_no_temporary_files(config: Path) -> None:
    for i in range(3):
        userconfig.remember_source(f"hf:owner/name{i}")
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_config_dir_is_not_an_error(config: Path) -> None:
    config.parent.mkdir(parents=True)
    config.parent.chmod(0o500)
    try:
        assert userconfig.remember_source("hf:owner/name") is False
        assert userconfig.default_source() == "demo"
    finally:
        config.parent.chmod(0o700)


def test_config_dir_that_is_a_file_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NANOCHAT_MLX_CONFIG_DIR", str(tmp_path / "file"))
    assert userconfig.remember_source("hf:owner/name") is False
    assert userconfig.default_source() == "demo"


def test_hint_only_for_the_demo() -> None:
    hint = userconfig.default_source_hint("demo")
    assert hint and "\n" not in hint and "nanochat-mlx models" in hint
    assert userconfig.default_source_hint("hf:owner/name") is None


def test_choice_is_remembered_across_processes(tmp_path: Path) -> None:
    env = {**os.environ, "NANOCHAT_MLX_CONFIG_DIR": str(tmp_path / "config")}

    def run(code: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run("from nanochat_mlx.userconfig import default_source; print(default_source())") == "demo"
    run("from nanochat_mlx.userconfig import remember_source; remember_source('hf:owner/name')")
    assert run("from nanochat_mlx.userconfig import default_source; print(default_source())") == "hf:owner/name"
