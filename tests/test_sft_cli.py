"""``nanochat-mlx sft`` end to end, as a subprocess on the fixture models."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HAS_TORCH, ROOT, variant_dir

SMALL = ["--batch-tokens", "1024", "--device-batch-size", "8", "--max-seq-len", "64", "--backend", "mlx"]


def run(*args: str, timeout: float = 300, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "nanochat_mlx.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def sums(n: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = r.randint(0, 9), r.randint(0, 9)
        user, assistant = f"add {a} and {b}", f"{a}+{b}={a + b}"
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sft-data")
    for name, rows in (("train", sums(64, 0)), ("val", sums(16, 1))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": str(root / "train.jsonl"), "val": str(root / "val.jsonl")}


def log(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]


def losses(directory: Path) -> list[float]:
    return [r["loss"] for r in log(directory) if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("sft") / "out"
    r = run("sft", "--source", str(variant_dir("g9")), "--data", data["train"], "--val", data["val"], "--out", str(out),
            "--steps", "12", "--eval-every", "6", *SMALL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out, r


def test_the_loss_falls(trained):
    out, _ = trained
    train = losses(out)
    val = [r["val_loss"] for r in log(out) if "val_loss" in r]
    assert len(train) == 12 and train[-1] < 0.5 * train[0]
    assert len(val) == 3 and val[0] > val[1] > val[2]  # steps 0, 6 and 12


def test_every_step_logs_loss_lr_tokens_and_speed(trained):
    out, _ = trained
    first = log(out)[1]  # after the step-0 validation
    assert set(first) == {"step", "loss", "lr_multiplier", "tokens", "tok_per_s"}
    assert first["step"] == 1 and first["tokens"] == 1024 and first["lr_multiplier"] == 1.0
    assert {"step", "val_loss", "val_bpb"} == set(log(out)[-1])


def test_the_output_is_a_reference_checkpoint_with_meta_and_tokenizer(trained):
    out, _ = trained
    meta = json.loads((out / "meta_000012.json").read_text())
    assert (out / "model_000012.pt").is_file() and (out / "tokenizer" / "tokenizer.pkl").is_file()
    assert meta["step"] == 12 and meta["model_config"]["n_layer"] == 4 and meta["val_loss"] > 0
    assert meta["user_config"]["matrix_lr"] == 0.02  # inherited from the source's meta


def test_a_second_run_inherits_the_first_runs_batch_geometry(trained):
    out, _ = trained
    meta = json.loads((out / "meta_000012.json").read_text())
    assert (meta["max_seq_len"], meta["device_batch_size"], meta["total_batch_size"]) == (64, 8, 1024)


def test_the_output_loads_in_the_chat_cli(trained):
    out, _ = trained
    r = run("--source", str(out), "-p", "hi", "-t", "0", "-m", "8")
    assert r.returncode == 0, r.stderr


def test_the_progress_line_shows_loss_speed_eta_and_memory(trained):
    _, r = trained
    line = next(x for x in r.stderr.splitlines() if x.startswith("step 12/12"))
    assert "100%" in line and "loss " in line and "tok/s" in line and "ETA" in line and "MiB" in line


def test_the_loss_curve_is_drawn(trained):
    out, _ = trained
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


NEEDS_TORCH = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
LORA = ["--lora-rank", "4", "--lr", "1e-2"]


@pytest.mark.parametrize(
    ("backend", "method"),
    [
        ("mlx", []),
        pytest.param("torch", [], marks=NEEDS_TORCH),
        ("mlx", LORA),
        pytest.param("torch", LORA, marks=NEEDS_TORCH),
    ],
    ids=["mlx", "torch", "mlx-lora", "torch-lora"],
)
def test_resume_continues_exactly_as_one_run(tmp_path, data, backend, method):
    # With a warmdown the schedule depends on the horizon (--steps), so a longer resumed run could not
    # match; without one, resuming at step 3 to step 6 must repeat the uninterrupted run's losses.
    common = ["--source", str(variant_dir("g1")), "--data", data["train"], "--eval-every", "-1",
              "--warmdown-ratio", "0", *SMALL[:-1], backend, *method]  # fmt: skip
    assert run("sft", *common, "--out", str(tmp_path / "one"), "--steps", "6").returncode == 0
    assert run("sft", *common, "--out", str(tmp_path / "two"), "--steps", "3").returncode == 0
    r = run("sft", "--resume", str(tmp_path / "two"), "--steps", "6")
    assert r.returncode == 0, r.stderr
    assert losses(tmp_path / "two") == losses(tmp_path / "one")


def test_ctrl_c_saves_the_step_and_resume_continues_exactly(tmp_path, data):
    common = ["--source", str(variant_dir("g1")), "--data", data["train"], "--eval-every", "-1", "--steps", "40",
              *SMALL]  # fmt: skip
    assert run("sft", *common, "--out", str(tmp_path / "one")).returncode == 0
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "nanochat_mlx.cli", "sft", *common, "--out", str(two)],
                               env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not ((two / "train_log.jsonl").exists() and len(losses(two)) >= 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    stopped = len(losses(two))
    assert 2 <= stopped < 40, stopped  # it stopped mid-run, at the end of a step
    assert f"stopped at step {stopped} (saved); continue with: nanochat-mlx sft --resume {two}" in process.stderr.read()
    r = run("sft", "--resume", str(two))
    assert r.returncode == 0, r.stderr
    assert losses(two) == losses(tmp_path / "one")


def test_by_default_the_run_is_one_epoch_of_the_data(tmp_path, data):
    out = tmp_path / "epoch"
    r = run("sft", "--source", str(variant_dir("g9")), "--data", data["train"], "--out", str(out),
            "--eval-every", "-1", *SMALL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    state = json.loads(next(out.glob("train_state_*.json")).read_text())
    steps = len(losses(out))
    # Each step packs 16 rows of 3 or 4 conversations: 64 conversations take 1 or 2 steps.
    assert state["data"]["consumed"] >= 64 and steps in (1, 2) and state["step"] == steps


def test_data_smaller_than_one_step_is_noted_with_how_often_it_repeats(tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps(r) + "\n" for r in sums(4, 2)))
    r = run("sft", "--source", str(variant_dir("g9")), "--data", str(tiny), "--out", str(tmp_path / "o"),
            "--steps", "1", *SMALL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    tokens = int(r.stderr.split(" examples (")[1].split(" tokens")[0].replace(",", ""))
    repeats = f"every step repeats it about {1024 / tokens:.0f} times"
    assert f"note: the data holds {tokens:,} tokens, under one step's 1,024: {repeats}" in r.stderr


def test_the_source_is_spelt_as_the_chat_command_takes_it(tmp_path, data):
    shutil.copytree(variant_dir("g9"), tmp_path / "base" / "chatsft_checkpoints" / "d4")
    r = run("sft", "-i", "sft", "-g", "d4", "--data", data["train"], "--out", str(tmp_path / "o"), "--steps", "1",
            *SMALL, NANOCHAT_BASE_DIR=str(tmp_path / "base"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("nanochat:sft/d4 (g9")


def test_without_a_source_sft_asks_for_one(tmp_path, data):
    r = run("sft", "--data", data["train"], "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.startswith("error: give --source (the checkpoint to fine-tune")


def test_a_second_run_into_the_same_folder_is_refused(trained, data):
    out, _ = trained
    r = run("sft", "--source", str(variant_dir("g9")), "--data", data["train"], "--out", str(out), *SMALL)
    expected = f"error: {out} already holds a run: continue it with --resume {out}, or pick another --out"
    assert r.returncode == 1 and r.stderr.strip() == expected


@pytest.mark.parametrize("state", ["{oops", "[1]", '{"step": 3}'])
def test_resuming_from_a_corrupt_state_is_one_line(tmp_path, state):
    (tmp_path / "train_state_000003.json").write_text(state)
    r = run("sft", "--resume", str(tmp_path))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'train_state_000003.json'}: "), r.stderr


def test_bad_data_is_one_line_and_strict_stops(tmp_path, data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(data["train"]).read_text() + "{oops\n")
    common = ["sft", "--source", str(variant_dir("g9")), "--data", str(bad), "--steps", "1", *SMALL]
    r = run(*common, "--out", str(tmp_path / "a"), "--strict")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {bad}:65: not JSON")
    r = run(*common, "--out", str(tmp_path / "b"))
    assert r.returncode == 0 and f"note: skipped 1 bad line(s); the first: {bad}:65: not JSON" in r.stderr


def test_a_batch_that_does_not_split_into_micro_batches_is_one_line(tmp_path, data):
    r = run("sft", "--source", str(variant_dir("g9")), "--data", data["train"], "--out", str(tmp_path / "o"),
            "--batch-tokens", "1000", "--device-batch-size", "8", "--max-seq-len", "64")  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "must be a multiple of" in r.stderr


@pytest.mark.parametrize("backend", ["mlx", pytest.param("torch", marks=NEEDS_TORCH)])
def test_lora_trains_adapters_and_fuses_a_loadable_checkpoint(tmp_path, data, backend):
    out = tmp_path / "lora"
    r = run("sft", "--source", str(variant_dir("g9")), "--data", data["train"], "--out", str(out), "--steps", "6",
            "--lora-rank", "4", "--lr", "1e-2", "--fuse", "--eval-every", "-1", *SMALL[:-1], backend)  # fmt: skip
    assert r.returncode == 0, r.stderr
    train = losses(out)
    assert train[-1] < train[0] and (out / "adapters.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["lora_rank"] == 4
    assert run("--source", str(out), "-p", "hi", "-t", "0", "-m", "4").returncode == 0


def test_full_fine_tuning_refuses_quantized_weights_in_one_line(tmp_path, data):
    r = run("sft", "--source", str(variant_dir("g9")), "--data", data["train"], "--out", str(tmp_path / "q"),
            "--quantize", "8", *SMALL)  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: full fine-tuning needs unquantized weights: drop --quantize, or use --lora-rank"
    )


@NEEDS_TORCH
def test_torch_lora_refuses_quantized_weights_in_one_line(tmp_path, data):
    r = run("sft", "--source", str(variant_dir("g9")), "--data", data["train"], "--out", str(tmp_path / "t"),
            "--lora-rank", "4", "--quantize", "8", *SMALL[:-1], "torch")  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: torch LoRA needs unquantized weights: drop --quantize (QLoRA runs on --backend mlx)"
    )


def launched(launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed")
def test_two_mlx_processes_log_the_losses_of_one(tmp_path, data):
    common = ["sft", "--source", str(variant_dir("g9")), "--data", data["train"], "--val", data["val"],
              "--steps", "4", "--eval-every", "-1", *SMALL[:2], "--device-batch-size", "4", *SMALL[4:]]  # fmt: skip
    assert run(*common, "--out", str(tmp_path / "one")).returncode == 0
    launch = [
        shutil.which("mlx.launch"),
        "-n",
        "2",
        "--backend",
        "ring",
        "--",
        sys.executable,
        "-m",
        "nanochat_mlx.cli",
    ]
    r = launched(launch, *common, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert [r["val_loss"] for r in log(tmp_path / "two") if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in log(tmp_path / "one") if "val_loss" in r], rel=1e-4
    )


@pytest.mark.slow
@NEEDS_TORCH
def test_two_torchrun_processes_log_the_losses_of_one(tmp_path, data):
    common = ["sft", "--source", str(variant_dir("g9")), "--data", data["train"], "--steps", "3",
              "--eval-every", "-1", *SMALL[:2], "--device-batch-size", "4", *SMALL[4:-1], "torch"]  # fmt: skip
    assert run(*common, "--out", str(tmp_path / "one")).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = launched([*torchrun, "-m", "nanochat_mlx.cli"], *common, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
