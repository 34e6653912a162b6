"""Peak memory and speed of full fine-tuning (``nanochat-mlx sft``) of a real-geometry model.

Writes a random-weight checkpoint folder of a nanochat geometry and generation (once: ``--work``
keeps it) and a small JSONL, then runs the ``sft`` command in a fresh process under
``/usr/bin/time -v`` and reports its peak resident memory (also as a multiple of the weights'
bytes) and the tokens/s of its steps. Run it alone on the machine (the peak is the process's).

    python benchmarks/sft_memory.py --geometry d20 --arch g9 --backend torch --work /tmp/sftmem \\
        --out benchmarks/results/sft_memory_d20_g9_torch.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from nanochat_mlx.synthetic import geometry_config, random_checkpoint
from nanochat_mlx.training.checkpoints import meta_model_config, write_pt, write_tokenizer


def write_source(folder: Path, geometry: str, arch: str, vocab_size: int) -> int:
    """The checkpoint folder (skipped when it is there); returns its parameter count."""
    done = folder / "params.json"
    if done.is_file():
        return json.loads(done.read_text())["params"]
    ckpt = random_checkpoint(geometry_config(geometry, arch, vocab_size=vocab_size), arch=arch)
    folder.mkdir(parents=True, exist_ok=True)
    write_pt(folder / "model_000000.pt", ckpt.weights)
    meta = {"step": 0, "model_config": meta_model_config(ckpt), "user_config": {}}
    (folder / "meta_000000.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_tokenizer(folder / "tokenizer", ckpt.tokenizer)
    params = sum(int(w.size) for w in ckpt.weights.values())
    done.write_text(json.dumps({"params": params}) + "\n")
    return params


def write_data(path: Path, n: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghij klmnopqrstuvwxyz"), 7)) for _ in range(3000)]
    rows = []
    for _ in range(n):
        question, answer = " ".join(rng.choice(words, 30)), " ".join(rng.choice(words, 200))
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", default="d20")
    p.add_argument("--arch", default="g9")
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--device-batch-size", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--work", type=Path, required=True, help="folder for the checkpoint (kept) and the run")
    p.add_argument("--out", type=Path, help="JSON results file")
    args = p.parse_args()

    source = args.work / f"{args.geometry}-{args.arch}-v{args.vocab_size}"
    params = write_source(source, args.geometry, args.arch, args.vocab_size)
    data, run = args.work / "data.jsonl", args.work / f"run-{args.backend}-{args.geometry}-{args.arch}"
    write_data(data)
    shutil.rmtree(run, ignore_errors=True)
    command = [sys.executable, "-m", "nanochat_mlx.cli", "sft", "--source", str(source), "--data", str(data),
               "--out", str(run), "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens),
               "--device-batch-size", str(args.device_batch_size), "--max-seq-len", str(args.max_seq_len),
               "--backend", args.backend, "--dtype", args.dtype, "--eval-every", "-1"]  # fmt: skip
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=os.environ)
    if done.returncode:
        sys.exit(f"sft failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    tok_per_s = [r["tok_per_s"] for r in steps if "tok_per_s" in r]
    weight_bytes = params * {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    result = {
        "geometry": args.geometry, "arch": args.arch, "vocab_size": args.vocab_size, "backend": args.backend,
        "dtype": args.dtype, "params": params, "weights_gib": weight_bytes / 2**30,
        "peak_rss_gib": peak_kib / 2**20, "peak_rss_x_weights": peak_kib * 1024 / weight_bytes,
        "tok_per_s": tok_per_s, "losses": [r["loss"] for r in steps if "loss" in r],
        "wall": re.search(r"Elapsed \(wall clock\) time.*: (\S+)", done.stderr).group(1),
        "command": " ".join(command[1:]), "load": os.getloadavg(),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
