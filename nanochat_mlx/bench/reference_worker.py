"""Worker process for ``bench --compare reference``: the reference's own engine, timed from outside.

Run by path (never imported by nanochat-mlx, and importing nothing of it): puts ``--repo`` (a
checkout of karpathy/nanochat) first on ``sys.path``, loads ``--checkpoint`` with the reference's
``checkpoint_manager.build_model`` (which reads the tokenizer from ``$NANOCHAT_BASE_DIR/tokenizer``)
and answers one JSON line per request on stdin, ``{"prompt": [ids], "n": tokens}``, with
``{"first_s", "last_s", "tokens"}``: when the first and the n-th token of a greedy
``Engine.generate`` reached this loop. The protocol uses a private copy of stdout; the reference's
own prints and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repo", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args()
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything the reference prints goes to stderr

    def send(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    try:
        import torch

        torch.set_num_threads(args.threads)
        sys.path.insert(0, str(Path(args.repo).resolve()))
        from nanochat.checkpoint_manager import build_model
        from nanochat.engine import Engine

        dtype = getattr(torch, args.dtype)

        def load():
            model, tokenizer, _ = build_model(args.checkpoint, args.step, torch.device("cpu"), phase="eval")
            # build_model holds float32 weights on CPU; for 16-bit runs hold them in that dtype, as ours
            # are. Buffers (the rotary tables) keep the dtype the reference gives them (bfloat16 in g1-g6,
            # else its compute dtype, set by NANOCHAT_DTYPE where it has one).
            for p in model.parameters():
                p.data = p.data.to(dtype)
            return model, tokenizer

        t0 = time.perf_counter()
        load()
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, tokenizer = load()
        warm = time.perf_counter() - t0
        engine = Engine(model, tokenizer)
    except Exception as e:  # report why to the parent in one line
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    send({"torch": torch.__version__, "threads": torch.get_num_threads(), "load_cold_s": cold, "load_warm_s": warm})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            send(_run(engine, request["prompt"], request["n"]))
        except Exception as e:
            send({"error": f"{type(e).__name__}: {e}"})
            return 1
    return 0


def _run(engine, prompt: list[int], n: int) -> dict:
    tokens: list[int] = []
    first = last = 0.0
    t0 = time.perf_counter()
    stream = engine.generate(prompt, num_samples=1, max_tokens=n, temperature=0.0)
    for column, _ in stream:
        last = time.perf_counter() - t0
        first = first or last
        tokens.append(column[0])
        if len(tokens) == n:
            break  # closing the generator skips the forward it would run for a token nobody asked for
    stream.close()
    return {"first_s": first, "last_s": last, "tokens": tokens}


if __name__ == "__main__":
    raise SystemExit(main())
