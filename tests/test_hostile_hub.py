"""The Hub when the network is missing: the cache first, one quick probe, one line saying what to do."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, variant_dir
from craft import assert_clean_failure, run_cli
from hubserver import FakeHub
from test_sources import REPO, build_hf_cache


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable_hub(tmp_path: Path) -> dict[str, str]:
    """An environment with a cached repo, the Hub at a closed local port and HF_HUB_OFFLINE unset."""
    build_hf_cache(tmp_path / "hf" / "hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
    }


def test_cached_repo_loads_without_the_network(unreachable_hub: dict[str, str]) -> None:
    """Once 24 s of retries; the cache answers first now (timed after the imports)."""
    code = (
        "import json, time\n"
        "import huggingface_hub.file_download\n"
        "from nanochat_mlx.checkpoint import read_checkpoint\n"
        "start = time.perf_counter()\n"
        f"c = read_checkpoint('hf:{REPO}/d20')\n"
        "print(json.dumps([c.spec.name, time.perf_counter() - start]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=unreachable_hub, timeout=60)
    assert out.returncode == 0, out.stderr
    generation, seconds = json.loads(out.stdout.strip().splitlines()[-1])
    assert generation == "g2" and seconds < 2.0
    assert "Retrying" not in out.stderr


def test_uncached_repo_with_no_network_fails_at_once(unreachable_hub: dict[str, str]) -> None:
    run = run_cli("hf:nobody/nothing", env=unreachable_hub)
    assert_clean_failure(run, "hf:nobody/nothing", "can't be reached", "--source", "HF_HUB_OFFLINE=1")
    assert "Retrying" not in run.stderr


def test_unreachable_hub_is_given_up_on_after_one_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from nanochat_mlx.errors import NanochatError
    from nanochat_mlx.hub import PROBE_TIMEOUT
    from nanochat_mlx.sources import resolve

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.perf_counter()
    with pytest.raises(NanochatError, match="can't be reached"):
        resolve("hf:nobody/nothing")
    assert time.perf_counter() - start < PROBE_TIMEOUT + 0.5


def test_cli_chats_with_a_cached_repo_when_the_hub_is_unreachable(unreachable_hub: dict[str, str]) -> None:
    run = run_cli(f"hf:{REPO}/d20", env=unreachable_hub, timeout=60)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    assert "Retrying" not in run.stderr


def test_uncached_repo_offline_fails_with_one_line(unreachable_hub: dict[str, str]) -> None:
    run = run_cli("hf:nobody/nothing", env={**unreachable_hub, "HF_HUB_OFFLINE": "1"})
    assert_clean_failure(run, "hf:nobody/nothing", "HF_HUB_OFFLINE=1", "--source")


# --- a stand-in Hub on a local port: only the selected files travel --------------------------


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    repo = tmp_path / "remote"
    repo.mkdir()
    for path in variant_dir("g1-multistep").glob("*_*"):
        shutil.copy(path, repo)
    shutil.copy(variant_dir("g1") / "tokenizer" / "tokenizer.pkl", repo)
    (repo / "README.md").write_text("a nanochat checkpoint")
    server = FakeHub(repo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


LOAD_WITH_PROGRESS = """
import json
from nanochat_mlx.checkpoint import read_checkpoint
calls = []
ckpt = read_checkpoint("hf:owner/remote", progress=lambda name, done, total: calls.append([name, done, total]))
print(json.dumps({"weights": [p.name for p in ckpt.files.weights], "progress": calls}))
"""


def test_download_fetches_only_the_selected_files_then_uses_the_cache(fake_hub: FakeHub, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=fake_hub.url)

    def load() -> dict:
        out = subprocess.run([sys.executable, "-c", LOAD_WITH_PROGRESS], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = load()
    assert first["weights"] == ["model_000200.pt"]
    fetched = {r.split()[1].rsplit("/", 1)[-1] for r in fake_hub.requests if r.startswith("GET /owner/")}
    assert fetched == {"model_000200.pt", "meta_000200.json", "tokenizer.pkl"}
    finished = {name: (done, total) for name, done, total in first["progress"]}
    size = (fake_hub.folder / "model_000200.pt").stat().st_size
    assert finished["model_000200.pt"] == (size, size)

    fake_hub.requests.clear()
    second = load()
    assert second == {"weights": ["model_000200.pt"], "progress": []} and fake_hub.requests == []


LOAD_MODEL_WITH_PROGRESS = """
import json
from nanochat_mlx.loading import load_model
from nanochat_mlx.options import LoadOptions
events = []
listen = lambda p: events.append([p.stage, p.message, p.done, p.total])
load_model(LoadOptions("hf:owner/remote", backend="mlx"), progress=listen)
print(json.dumps(events))
"""


def test_load_model_reports_download_bytes_through_its_progress_callback(fake_hub: FakeHub, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=fake_hub.url)
    out = subprocess.run([sys.executable, "-c", LOAD_MODEL_WITH_PROGRESS], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    events = json.loads(out.stdout.strip().splitlines()[-1])
    assert [e[0] for e in events][0] == "checkpoint" and [e[0] for e in events][-2:] == ["model", "engine"]
    size = (fake_hub.folder / "model_000200.pt").stat().st_size
    assert ["checkpoint", "Downloading model_000200.pt", size, size] in events
    assert "model_000200" not in out.stderr  # no stderr bars when a listener is given
