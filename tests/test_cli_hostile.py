"""The nanochat-mlx command when its surroundings misbehave: an early Ctrl-C, closed or full
standard streams, endless stdin. Each case is one line on stderr (or none) and the right exit status."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import variant_dir

CLI = [sys.executable, "-m", "nanochat_mlx.cli"]


@pytest.mark.parametrize("delay", [0.25, 0.5, 0.75, 1.0])
def test_ctrl_c_during_startup_exits_130_without_a_traceback(delay):
    # -p - waits on stdin after loading, so the process is still running whenever the signal lands:
    # while importing, loading or reading.
    proc = subprocess.Popen(
        [*CLI, "--source", str(variant_dir("g1")), "-p", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"Error" not in err
    assert out == b""


def test_the_package_and_the_cli_import_without_the_model_code():
    code = "import sys, nanochat_mlx.cli; print(sorted({'numpy', 'ml_dtypes', 'mlx'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.stdout.decode().strip() == "[]", r.stderr.decode()


def test_every_public_name_still_resolves():
    code = "import nanochat_mlx as nc; print(all(getattr(nc, n) is not None for n in nc.__all__), callable(nc.load))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.stdout.decode().strip() == "True True", r.stderr.decode()
