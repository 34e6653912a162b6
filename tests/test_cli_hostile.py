"""The nanochat-mlx command when its surroundings misbehave: an early Ctrl-C, closed or full
standard streams, endless stdin. Each case is one line on stderr (or none) and the right exit status."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import variant_dir

CLI = [sys.executable, "-m", "nanochat_mlx.cli"]
G1 = str(variant_dir("g1"))
ONE_SHOT = ["--source", G1, "-p", "hi", "-t", "0", "-m", "4"]
needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")


def shell(args: list[str], redirections: str) -> subprocess.CompletedProcess:
    """The CLI run by bash with ``redirections`` (``>&-``, ``2>/dev/full``, ...) applied; bash's own
    stderr is the captured one, so a closed stderr is closed for the CLI only."""
    command = f"{shlex.join([*CLI, *args])} {redirections}"
    return subprocess.run(["bash", "-c", command], stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("delay", [0.5, 0.75, 1.0])
def test_ctrl_c_during_startup_exits_130_without_a_traceback(delay):
    # -p - waits on stdin after loading, so the process is still running whenever the signal lands:
    # while importing, loading or reading. (Not sooner: before Python has run a line of ours, which
    # on a busy machine takes a few tenths of a second, its own KeyboardInterrupt is all there is.)
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


# --- closed and full standard streams -------------------------------------------------------------


def test_a_closed_stdout_is_one_line_error():
    assert "stdout is closed" in one_line_error(shell(ONE_SHOT, ">&-"))


@needs_dev_full
@pytest.mark.parametrize("args", [ONE_SHOT, ["models"], ["info", G1]], ids=["prompt", "models", "info"])
def test_a_full_stdout_is_named_in_one_line(args):
    assert "can't write to stdout: No space left on device" in one_line_error(shell(args, ">/dev/full"))


@pytest.mark.parametrize("args", [["-p", "-"], []], ids=["prompt", "repl"])
def test_a_closed_stdin_is_one_line_error(args):
    assert "stdin is closed" in one_line_error(shell(["--source", G1, *args], "<&-"))


@pytest.mark.parametrize("redirection", ["2>&-", pytest.param("2>/dev/full", marks=needs_dev_full)])
def test_a_closed_or_full_stderr_does_not_stop_the_reply(redirection):
    want = shell(ONE_SHOT, "")
    assert want.returncode == 0 and want.stdout.strip()
    r = shell(ONE_SHOT, redirection)
    assert (r.returncode, r.stdout) == (0, want.stdout)


# --- endless stdin ----------------------------------------------------------------------------------


def test_an_endless_stdin_is_refused_after_reading_no_more_than_could_fit_the_context():
    proc = subprocess.Popen(
        [*CLI, "--source", G1, "-p", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    sent, chunk = 0, b"word " * 13107  # 64 KiB a write, up to 8 MiB; the CLI leaving ends the writing
    try:
        while sent < 8 * 2**20:
            proc.stdin.write(chunk)
            sent += len(chunk)
    except BrokenPipeError:
        pass
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and out == b""
    assert err.decode().startswith("error: the prompt on stdin is longer than the model's context (640 tokens)")
    assert err.count(b"\n") == 1
    assert sent < 2**20  # what it read, give or take the pipe's buffer
