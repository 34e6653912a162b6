"""The Hub when the network is missing: the cache first, one quick probe, one line saying what to do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from craft import assert_clean_failure, run_cli
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
    """Once 24 s of retries; the cache answers first now (the time is the load's, not the import's)."""
    code = (
        "import json, time\n"
        "start = time.perf_counter()\n"
        "from nanochat_mlx.checkpoint import read_checkpoint\n"
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
    assert "Retrying" not in run.stderr and run.seconds < 3.0


def test_cli_chats_with_a_cached_repo_when_the_hub_is_unreachable(unreachable_hub: dict[str, str]) -> None:
    run = run_cli(f"hf:{REPO}/d20", env=unreachable_hub, timeout=60)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    assert "Retrying" not in run.stderr


def test_uncached_repo_offline_fails_with_one_line(unreachable_hub: dict[str, str]) -> None:
    run = run_cli("hf:nobody/nothing", env={**unreachable_hub, "HF_HUB_OFFLINE": "1"})
    assert_clean_failure(run, "hf:nobody/nothing", "HF_HUB_OFFLINE=1", "--source")
