"""Training speed and memory: our ``sft`` (full and LoRA) against ``mlx_lm``'s LoRA trainer.

One process, identical inputs: a random-weight g1 checkpoint of a nanochat geometry (written once
to a temporary folder), the same packed rows of ``--seq-len + 1`` tokens, the same LoRA rank and
layers, the same batch. ``mlx_lm.tuner.trainer.train`` (what ``mlx_lm.lora`` runs) trains
``mlx_lm.models.nanochat.Model`` loaded with the same tensors, its adapters made by
``mlx_lm.tuner.utils.linear_to_lora_layers``. Tokens/s is the median over the steps after the
warm-up ones; peak memory is MLX's peak allocation during each run.

    python benchmarks/train_bench.py --geometry d4 --seq-len 256 --rows 8 --steps 12 --out benchmarks/results/train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from nanochat_mlx.backends import build_model
from nanochat_mlx.backends.mlx.model import to_mlx
from nanochat_mlx.synthetic import geometry_config, random_checkpoint
from nanochat_mlx.training import save_checkpoint
from nanochat_mlx.training.data import Packer, read_dataset
from nanochat_mlx.training.sft import main as sft_main


def write_source(folder: Path, geometry: str, seq_len: int, vocab_size: int):
    config = geometry_config(geometry, "g1", vocab_size=vocab_size, sequence_len=max(seq_len, 256))
    ckpt = random_checkpoint(config, arch="g1")
    save_checkpoint(folder, 0, build_model(ckpt, "mlx", dtype="float32"), ckpt.tokenizer)
    return ckpt


def write_data(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghij klmnop"), 8)) for _ in range(4000)]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 400))}) + "\n" for _ in range(n)))


def ours(source: Path, data: Path, out: Path, args: argparse.Namespace, lora: bool) -> dict:
    argv = ["sft", "--source", str(source), "--data", str(data), "--out", str(out), "--steps", str(args.steps),
            "--max-seq-len", str(args.seq_len), "--device-batch-size", str(args.rows),
            "--batch-tokens", str(args.rows * args.seq_len), "--eval-every", "-1", "--backend", "mlx",
            "--dtype", args.dtype]  # fmt: skip
    if lora:
        argv += ["--lora-rank", str(args.rank), "--lora-layers", str(args.layers)]
    mx.reset_peak_memory()
    sft_main(argv[1:])
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in steps if "tok_per_s" in r][args.warmup :]
    return {"tok_per_s": statistics.median(tps), "peak_memory_bytes": int(mx.get_peak_memory())}


def mlx_lm_lora(ckpt, rows: list[list[int]], args: argparse.Namespace) -> dict:
    import mlx.optimizers as optim
    from mlx_lm.models.nanochat import Model, ModelArgs
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    c = ckpt.config
    model = Model(
        ModelArgs(hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                  num_key_value_heads=c.n_kv_head, vocab_size=c.vocab_size, max_position_embeddings=c.sequence_len,
                  intermediate_size=4 * c.n_embd, rope_theta=ckpt.spec.rope_base)
    )  # fmt: skip
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}[args.dtype]
    weights = []
    for name, a in ckpt.weights.items():
        a = a[: c.vocab_size] if name in ("transformer.wte.weight", "lm_head.weight") else a
        weights.append((name, to_mlx(a).astype(dtype)))
    model.load_weights(weights, strict=True)
    model.freeze()
    linear_to_lora_layers(model, args.layers, {"rank": args.rank, "scale": 2.0, "dropout": 0.0})
    mx.eval(model.parameters())

    class Report(TrainingCallback):
        def __init__(self) -> None:
            self.tps: list[float] = []

        def on_train_loss_report(self, info: dict) -> None:
            self.tps.append(info["tokens_per_second"])

    report = Report()
    dataset = [(r, 0) for r in rows]
    targs = TrainingArgs(batch_size=args.rows, iters=args.steps, steps_per_report=1, steps_per_eval=10**9,
                         steps_per_save=10**9, max_seq_length=args.seq_len + 1,
                         adapter_file=str(Path(tempfile.mkdtemp()) / "a.safetensors"))  # fmt: skip
    mx.reset_peak_memory()
    train(model, optim.AdamW(learning_rate=1e-4, weight_decay=0.0), dataset, None, targs, training_callback=report)
    return {"tok_per_s": statistics.median(report.tps[args.warmup :]), "peak_memory_bytes": int(mx.get_peak_memory())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", default="d4")
    p.add_argument("--vocab-size", type=int, default=4096, help="of the synthetic byte-level tokenizer")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = write_source(tmp / "source", args.geometry, args.seq_len, args.vocab_size)
        write_data(tmp / "data.jsonl", 200, 0)
        dataset = read_dataset(tmp / "data.jsonl", ckpt.tokenizer, args.seq_len + 1)
        packer = Packer(dataset, args.seq_len + 1, ckpt.tokenizer.get_bos_token_id(), seed=42)
        rows = [r.ids.tolist() for r in packer.rows(args.rows * (args.steps + 1))]
        results = {"device": str(mx.default_device()), "args": vars(args), "when": time.strftime("%Y-%m-%d %H:%M")}
        results["mlx_lm_lora"] = mlx_lm_lora(ckpt, rows, args)
        results["ours_lora"] = ours(tmp / "source", tmp / "data.jsonl", tmp / "lora", args, lora=True)
        results["ours_full"] = ours(tmp / "source", tmp / "data.jsonl", tmp / "full", args, lora=False)
    ours_lora, theirs = results["ours_lora"], results["mlx_lm_lora"]
    results["lora_speed_ratio"] = ours_lora["tok_per_s"] / theirs["tok_per_s"]
    results["lora_memory_ratio"] = ours_lora["peak_memory_bytes"] / theirs["peak_memory_bytes"]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
