"""Regenerate the built-in demo model from scratch on a CPU: ``python -m benchmarks.demo.build --out DIR``.

Stages (each one's wall time goes into ``DIR/build.json``):
1. data: ``benchmarks.demo.data`` writes text, chat and held-out files into ``DIR/data``;
2. tokenizer: rustbpe learns ``--vocab-size`` tokens from them (``DIR/tokenizer``);
3. init: a fresh g9 checkpoint of the demo geometry, the reference's init (``DIR/init``);
4. pretrain: ``nanochat-mlx sft --data text.jsonl`` (every token trained; ``DIR/pretrain``);
5. chat: ``nanochat-mlx sft --data chat.jsonl`` from the pretrained weights (``DIR/chat``);
6. evaluate: ``benchmarks.demo.evaluate`` on the held-out text and arithmetic (``DIR/eval.json``).
``--ship`` then copies the chat checkpoint into ``nanochat_mlx/demo/model/`` with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nanochat_mlx.config import ModelConfig

from . import data, evaluate, init, tokenizer

REPO = Path(__file__).resolve().parents[2]
SHIP_DIR = REPO / "nanochat_mlx" / "demo" / "model"
# The demo geometry: 4 layers of width 128 (2 heads of 64), SSSL windows, a 256-token context.
GEOMETRY = dict(n_layer=4, n_embd=128, n_head=2, n_kv_head=2, sequence_len=256, window_pattern="SSSL")
# What ``nanochat-mlx sft`` inherits from the initial checkpoint (as from a reference base model).
TRAINING = {
    "max_seq_len": 256,
    "device_batch_size": 16,
    "total_batch_size": 8192,
    "user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02},
}


def sft(source: Path, out: Path, data_file: Path, val_file: Path | None, steps: int, extra: list[str], env) -> None:
    cmd = [sys.executable, "-m", "nanochat_mlx.cli", "sft", "--source", str(source), "--data", str(data_file)]
    cmd += ["--out", str(out), "--steps", str(steps), "--eval-every", "-1", "--backend", "auto", "--dtype", "float32"]
    # Explicit, because a checkpoint written by sft does not carry them for the next sft to inherit.
    cmd += ["--max-seq-len", str(TRAINING["max_seq_len"]), "--device-batch-size", str(TRAINING["device_batch_size"])]
    cmd += ["--batch-tokens", str(TRAINING["total_batch_size"])]
    cmd += ["--val", str(val_file)] if val_file else []
    subprocess.run(cmd + extra, check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="working folder (data, checkpoints, figures)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--pretrain-steps", type=int, default=60, help="steps of 8,192 tokens on text (default 60)")
    p.add_argument("--chat-steps", type=int, default=300, help="steps of 8,192 tokens on chat (default 300)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the matrices are tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, help="evaluate only the first N arithmetic questions")
    p.add_argument("--ship", action="store_true", help="copy the result into nanochat_mlx/demo/model/")
    args = p.parse_args(argv)
    out: Path = args.out
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    times: dict[str, float] = {}

    def stage(name: str, run) -> None:
        start = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        run()
        times[name] = round(time.perf_counter() - start, 1)
        print(f"== {name}: {times[name]:.0f} s", file=sys.stderr, flush=True)

    d = out / "data"
    stage("data", lambda: print(data.build(d, out / "cache", args.seed), file=sys.stderr))
    tok: list = []
    stage("tokenizer", lambda: tok.append(tokenizer.build(d, out / "tokenizer", args.vocab_size)))
    config = ModelConfig(vocab_size=tok[0].vocab_size, **GEOMETRY)
    stage("init", lambda: init.write_initial_checkpoint(out / "init", config, tok[0], TRAINING, args.seed))
    pretrain = ["--init-lr-frac", "1.0", "--warmup-ratio", "0.1", "--final-lr-frac", "0.05"]
    stage("pretrain", lambda: sft(out / "init", out / "pretrain", d / "text.jsonl", d / "val_text.jsonl",
                                  args.pretrain_steps, pretrain, env))  # fmt: skip
    stage("chat", lambda: sft(out / "pretrain", out / "chat", d / "chat.jsonl", None, args.chat_steps, [], env))
    figures: dict = {}
    stage("evaluate", lambda: figures.update(evaluate.evaluate_model(str(out / "chat"), d, args.eval_limit)))
    # Bits per byte after pretraining too: the chat phase trades much of the text modelling away.
    pretrain_meta = max((out / "pretrain").glob("meta_*.json"))
    figures["pretrain_val_bpb"] = round(json.loads(pretrain_meta.read_text())["val_bpb"], 4)
    record = {
        "seconds": times,
        "figures": figures,
        "geometry": GEOMETRY,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if args.ship:
        ship(out / "chat", figures, times)
    return 0


def ship(checkpoint: Path, figures: dict, times: dict) -> None:
    """The latest checkpoint of ``checkpoint`` (model, meta, tokenizer.pkl) into the package, with its figures."""
    meta = max(checkpoint.glob("meta_*.json"))
    step = meta.stem.removeprefix("meta_")
    if SHIP_DIR.exists():
        shutil.rmtree(SHIP_DIR)
    (SHIP_DIR / "tokenizer").mkdir(parents=True)
    shutil.copy(checkpoint / f"model_{step}.pt", SHIP_DIR / f"model_{step}.pt")
    shutil.copy(checkpoint / "tokenizer" / "tokenizer.pkl", SHIP_DIR / "tokenizer" / "tokenizer.pkl")
    kept = {k: v for k, v in json.loads(meta.read_text()).items() if k in ("step", "model_config")}
    kept["demo"] = {"figures": figures, "build_seconds": times}
    (SHIP_DIR / meta.name).write_text(json.dumps(kept, indent=2) + "\n")
    print(f"shipped {SHIP_DIR}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
