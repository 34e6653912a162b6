"""Start the real ``nanochat-mlx serve`` as a subprocess on a free localhost port, for tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    """Status and JSON body of a GET (errors included)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Server:
    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process, self.port = process, port
        self.url = f"http://127.0.0.1:{port}"
        self.first_health: int | None = None  # the status of the first /health answer

    def health(self) -> dict:
        return get(self.url + "/health")[1]

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read().decode()}")
            try:
                status, _ = get(self.url + "/health")
            except OSError:
                time.sleep(0.05)
                continue
            self.first_health = self.first_health or status
            if status == 200:
                return
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready")


@contextlib.contextmanager
def serve(*args: str, source: str = "fixtures/g1", backend: str = "mlx", wait: bool = True) -> Iterator[Server]:
    """A running server on ``source``; stopped (and reaped) on exit."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    source = source if source.startswith(("hf:", "/")) or source == "demo" else str(ROOT / source)
    command = [sys.executable, "-m", "nanochat_mlx.cli", "serve", "--source", source, "--backend", backend,
               "--port", str(port), *args]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = Server(process, port)
    try:
        if wait:
            server.wait_ready()
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
