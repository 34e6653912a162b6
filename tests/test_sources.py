"""Resolving source strings to checkpoint files: local folders, the nanochat base dir, the Hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, copy_variant, expected_json, expected_npz, variant_dir

import nanochat_mlx as nc
from nanochat_mlx.checkpoint import read_checkpoint
from nanochat_mlx.errors import NanochatError
from nanochat_mlx.hub import select_files
from nanochat_mlx.sources import resolve

ATOL = 1e-4


def p1_ids(variant: str) -> list[int]:
    return next(p["ids"] for p in expected_json(variant, "prompts.json")["prompts"] if p["name"] == "p1_short")


def matches_reference(model, variant: str) -> bool:
    found = np.array(model(mx.array([p1_ids(variant)]))[0])
    return float(np.max(np.abs(found - expected_npz(variant, "logits_full.npz")["p1_short"]))) <= ATOL


def native_files(variant: str, dest: Path, tokenizer: bool = False) -> Path:
    """The model and meta of a variant copied into ``dest`` (optionally its tokenizer/ too)."""
    dest.mkdir(parents=True, exist_ok=True)
    src = variant_dir(variant)
    for p in [*src.glob("model_*.pt"), *src.glob("meta_*.json")]:
        shutil.copy(p, dest / p.name)
    if tokenizer:
        shutil.copytree(src / "tokenizer", dest / "tokenizer")
    return dest


# --- local folders --------------------------------------------------------------------------


def test_native_folder_picks_highest_step() -> None:
    files = resolve(str(variant_dir("g1-multistep")))
    assert files.layout == "native"
    assert files.step == 200
    assert [p.name for p in files.weights] == ["model_000200.pt"]
    assert files.meta.name == "meta_000200.json"


def test_native_folder_explicit_step() -> None:
    files = resolve(str(variant_dir("g1-multistep")), step=100)
    assert [p.name for p in files.weights] == ["model_000100.pt"]
    assert files.meta.name == "meta_000100.json"


def test_model_file_as_source() -> None:
    files = resolve(str(variant_dir("g1-multistep") / "model_000100.pt"))
    assert files.step == 100 and files.meta.name == "meta_000100.json"


def test_unsuffixed_model_pt_and_meta_json(tmp_path: Path) -> None:
    folder = copy_variant("g1", tmp_path / "ckpt")
    (folder / "model_000500.pt").rename(folder / "model.pt")
    (folder / "meta_000500.json").rename(folder / "meta.json")
    files = resolve(str(folder))
    assert (files.weights, files.meta, files.step) == ([folder / "model.pt"], folder / "meta.json", None)
    model, _ = nc.load(str(folder), dtype="float32")
    assert matches_reference(model, "g1")


def test_safetensors_in_place_of_pt(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from nanochat_mlx.ptfile import read_pt

    folder = copy_variant("g1", tmp_path / "ckpt")
    state = {k: np.asarray(v, np.float32) for k, v in read_pt(folder / "model_000500.pt").items()}
    (folder / "model_000500.pt").unlink()
    save_file(state, str(folder / "model_000500.safetensors"))
    files = resolve(str(folder))
    assert files.layout == "native" and files.weights == [folder / "model_000500.safetensors"]
    model, _ = nc.load(str(folder), dtype="float32")
    assert matches_reference(model, "g1")


def test_tokenizer_beside_model(tmp_path: Path) -> None:
    folder = native_files("g1", tmp_path / "ckpt")
    shutil.copy(variant_dir("g1") / "tokenizer" / "tokenizer.pkl", folder)
    assert resolve(str(folder)).tokenizer == folder / "tokenizer.pkl"


def test_tokenizer_in_tokenizer_subfolder(tmp_path: Path) -> None:
    folder = native_files("g1", tmp_path / "ckpt", tokenizer=True)
    assert resolve(str(folder)).tokenizer == folder / "tokenizer" / "tokenizer.pkl"


def test_tokenizer_in_base_dir_two_levels_up(tmp_path: Path) -> None:
    base = tmp_path / "nanochat"
    folder = native_files("g1", base / "base_checkpoints" / "d4")
    shutil.copytree(variant_dir("g1") / "tokenizer", base / "tokenizer")
    assert resolve(str(folder)).tokenizer == base / "tokenizer" / "tokenizer.pkl"


def test_checkpoint_in_subfolder_found_shallowest(tmp_path: Path) -> None:
    root = tmp_path / "downloads"
    native_files("g1", root / "a" / "deep" / "er", tokenizer=True)  # sorts first, but deeper
    shallow = native_files("g2", root / "z" / "ckpt", tokenizer=True)
    files = resolve(str(root))
    assert files.folder == shallow


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NanochatError) as err:
        resolve(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(err.value)


def test_folder_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(NanochatError) as err:
        resolve(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)


# --- nanochat base dir ----------------------------------------------------------------------


@pytest.fixture
def base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A nanochat base dir: base_checkpoints/{d4,d12}, chatsft_checkpoints/d4, tokenizer/."""
    base = tmp_path / "nanochat"
    native_files("g1", base / "base_checkpoints" / "d4")
    native_files("g2", base / "base_checkpoints" / "d12")  # d12 > d4 (compares numerically, not as text)
    native_files("g9", base / "chatsft_checkpoints" / "d4")
    shutil.copytree(variant_dir("g1") / "tokenizer", base / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


def test_nanochat_base_picks_largest_depth_tag(base_dir: Path) -> None:
    files = resolve("nanochat:base")
    assert files.folder == base_dir / "base_checkpoints" / "d12"
    assert files.tokenizer == base_dir / "tokenizer" / "tokenizer.pkl"


def test_nanochat_sft_with_tag(base_dir: Path) -> None:
    ckpt = read_checkpoint("nanochat:sft/d4")
    assert ckpt.files.folder == base_dir / "chatsft_checkpoints" / "d4"
    assert ckpt.spec.name == "g9"


def test_nanochat_base_with_tag_loads(base_dir: Path) -> None:
    model, _ = nc.load("nanochat:base/d4", dtype="float32")
    assert matches_reference(model, "g1")


def test_nanochat_missing_phase_dir(base_dir: Path) -> None:
    with pytest.raises(NanochatError) as err:
        resolve("nanochat:rl")
    assert str(base_dir / "chatrl_checkpoints") in str(err.value)


def test_nanochat_unknown_tag(base_dir: Path) -> None:
    with pytest.raises(NanochatError) as err:
        resolve("nanochat:sft/d99")
    assert "d99" in str(err.value)


# --- Hugging Face Hub (offline, local cache) ------------------------------------------------

REPO = "owner/name"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hf_cache(hub_cache: Path) -> Path:
    """``hub/models--owner--name`` with one snapshot: a root tokenizer and three checkpoints."""
    repo_dir = hub_cache / "models--owner--name"
    snap = repo_dir / "snapshots" / COMMIT
    native_files("g1", snap / "d12")
    shutil.copy(variant_dir("g1") / "tokenizer" / "tokenizer.pkl", snap / "tokenizer.pkl")
    native_files("g2", snap / "d20")
    native_files("g9", snap / "archive" / "old")  # sorts first, but two levels down
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    hub = tmp_path / "hf" / "hub"
    snap = build_hf_cache(hub)
    # huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into its constants at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snap


def test_hub_repo_picks_the_shallowest_checkpoint_and_of_those_the_largest_tag(hf_cache: Path) -> None:
    ckpt = read_checkpoint(f"hf:{REPO}")
    assert ckpt.files.folder == hf_cache / "d20"  # archive/old sorts first, but lies deeper
    assert ckpt.files.tokenizer == hf_cache / "tokenizer.pkl"
    assert ckpt.spec.name == "g2"
    assert ckpt.notes[0].startswith(f"hf:{REPO} holds 2 checkpoint folders: running d20 (the others: d12;")


def test_hub_subfolder(hf_cache: Path) -> None:
    ckpt = read_checkpoint(f"hf:{REPO}/d20")
    assert ckpt.files.folder == hf_cache / "d20"
    assert ckpt.spec.name == "g2"


def test_hub_nested_subfolder_loads(hf_cache: Path) -> None:
    model, _ = nc.load(f"hf:{REPO}/archive", dtype="float32")
    assert matches_reference(model, "g9")


def test_hub_uncached_repo_offline(hf_cache: Path) -> None:
    with pytest.raises(NanochatError) as err:
        resolve("hf:someone/not-cached")
    assert "someone/not-cached" in str(err.value)
    assert "--source" in str(err.value)


def test_hub_missing_subfolder(hf_cache: Path) -> None:
    with pytest.raises(NanochatError) as err:
        resolve(f"hf:{REPO}/d99")
    assert REPO in str(err.value) and "d99" in str(err.value)


def test_hub_env_vars_in_fresh_process(tmp_path: Path) -> None:
    """HF_HOME and HF_HUB_OFFLINE set in the environment (read by huggingface_hub at import)."""
    build_hf_cache(tmp_path / "hf" / "hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    code = (
        "import json; from nanochat_mlx.checkpoint import read_checkpoint\n"
        f"c = read_checkpoint('hf:{REPO}/d20')\n"
        "print(json.dumps([str(c.files.folder), c.spec.name]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    folder, gen = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(folder).name == "d20" and COMMIT in folder and gen == "g2"


def test_hub_spec_parsing() -> None:
    from nanochat_mlx.sources import parse_hub_spec

    assert parse_hub_spec("owner/name") == ("owner/name", "", None)
    assert parse_hub_spec("owner/name/d20@v1") == ("owner/name", "d20", "v1")
    with pytest.raises(NanochatError):
        parse_hub_spec("justname")
    with pytest.raises(NanochatError, match=r"^hf:owner/name@: expected"):
        parse_hub_spec("owner/name@")  # an empty revision is a typo, not the default branch


def test_a_demo_step_that_does_not_exist_is_named_demo_not_its_install_path() -> None:
    with pytest.raises(NanochatError, match=r"^demo: no checkpoint for step 3 in the folder \(steps present: \d+\)$"):
        resolve("demo", step=3)


# --- hub.select_files -----------------------------------------------------------------------

ANTIGMA_LIKE = [
    ".gitattributes",
    "README.md",
    "model_000500.pt",
    "meta_000500.json",
    "model_000650.pt",
    "meta_000650.json",
    "tokenizer.pkl",
    "token_bytes.pt",
    "d20/model_000021400.pt",
    "d20/meta_000021400.json",
    "d20/tokenizer.pkl",
    "d20/optim_000021400_rank0.pt",
]


def test_select_files_root_highest_step() -> None:
    assert select_files(ANTIGMA_LIKE) == ["meta_000650.json", "model_000650.pt", "tokenizer.pkl"]


def test_select_files_root_with_step() -> None:
    assert select_files(ANTIGMA_LIKE, step=500) == ["meta_000500.json", "model_000500.pt", "tokenizer.pkl"]


def test_select_files_subfolder() -> None:
    picked = select_files(ANTIGMA_LIKE, subdir="d20")
    assert "d20/model_000021400.pt" in picked and "d20/meta_000021400.json" in picked
    assert "d20/tokenizer.pkl" in picked
    assert not {"model_000650.pt", "d20/optim_000021400_rank0.pt"} & set(picked)


def test_select_files_subfolder_uses_root_tokenizer() -> None:
    files = ["tokenizer/tokenizer.pkl", "d12/model_000100.pt", "d12/meta_000100.json", "notes/README.md"]
    assert select_files(files) == ["d12/meta_000100.json", "d12/model_000100.pt", "tokenizer/tokenizer.pkl"]


def test_side_by_side_model_tags_run_the_largest_as_the_reference_picks() -> None:
    tags = [f"d{n}/{name}" for n in (8, 12, 4) for name in ("model_000100.pt", "meta_000100.json")]
    files = ["tokenizer.pkl", *tags]
    assert select_files(files) == ["d12/meta_000100.json", "d12/model_000100.pt", "tokenizer.pkl"]


def test_side_by_side_checkpoints_say_which_one_runs(tmp_path: Path) -> None:
    for name in ("run_b", "run_a", "run_c"):
        native_files("g1", tmp_path / name, tokenizer=True)
    files = resolve(str(tmp_path))
    assert files.folder == tmp_path / "run_a"  # no model tags: by name
    running = "running run_a (the others: run_b, run_c; give its folder to run another)"
    assert files.notes == [f"{tmp_path} holds 3 checkpoint folders: {running}"]
    assert resolve(str(tmp_path / "run_b")).notes == []


def test_select_files_config_layout() -> None:
    files = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"]
    assert select_files(files) == sorted(files)


def test_select_files_no_checkpoint() -> None:
    assert select_files(["README.md", "tokenizer.pkl"]) == []
