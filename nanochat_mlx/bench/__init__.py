"""``nanochat-mlx bench``: load time, TTFT, prefill and decode speed, memory, roofline, comparisons.

Implementations measured on identical weights, trials interleaved, one outside clock for all:
  * ``nanochat-mlx``: our model driven by our ``Engine`` (the product path), MLX or torch backend;
  * ``mlx-lm``: ``mlx_lm.models.nanochat.Model`` driven by ``mlx_lm.generate.generate_step``
    (g1 math only, so only for g1/g2 checkpoints and geometries);
  * ``reference``: the reference's own code from a checkout of karpathy/nanochat the user points
    to (``--reference-repo``), on the same native checkpoint folder.
Greedy decoding everywhere; our stop tokens are ignored so every run decodes the same number of tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..checkpoint import read_checkpoint
from ..errors import NanochatError
from .report import ROW_KEYS, machine_facts, markdown, plot
from .run import chat_turn_ttft, run_benchmark

__all__ = ["ROW_KEYS", "main", "parser", "run_benchmark"]


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    from ..cli import Parser

    p = Parser(prog="nanochat-mlx bench", description=__doc__.splitlines()[0].replace("``", ""))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", help="checkpoint to benchmark (any source nanochat-mlx loads)")
    src.add_argument("--geometry", help="random weights with nanochat's shapes: d12, d20, d32 (default d12)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the highest)")
    p.add_argument("--arch", default=None, help="generation g1..g9 (geometry default g9; source: detected)")
    p.add_argument("--backend", default="mlx", choices=("mlx", "torch", "all"), help="which backend(s) to run")
    p.add_argument("--dtype", action="append", help="float32, bfloat16, float16 (repeat or comma-separate)")
    p.add_argument("--quantize", action="append", help="4 or 8 (repeat or comma-separate; 'none' = unquantized)")
    p.add_argument("--compare", action="append", help="mlx-lm, reference or all (repeat or comma-separate)")
    p.add_argument(
        "--reference-repo", type=Path, default=None,
        help="checkout of karpathy/nanochat (at the commit of the generation under test) for --compare reference",
    )  # fmt: skip
    p.add_argument("--prompt-tokens", default=None, help="comma-separated prompt lengths (default 128,1024)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per run (default 32)")
    p.add_argument("--quick", action="store_true", help="one trial, one short prompt, few decoded tokens")
    p.add_argument("--trials", type=int, default=None, help="trials per configuration (default 3)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random geometry weights")
    p.add_argument(
        "--chat-turns", type=int, default=5, help="TTFT of this chat turn with/without the prompt cache (0: skip)"
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="serving benchmark: start the real server and drive it with N concurrent streaming clients",
    )
    p.add_argument("--concurrency", default="1,2,4,8,16", help="with --serve: comma-separated client counts")
    p.add_argument("--json", type=Path, default=None, help="write rows (and machine facts) as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown tables")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of tok/s vs context (needs matplotlib)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nanochat-mlx bench``; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _quantize(values: list[str]) -> tuple[int | None, ...]:
    out: list[int | None] = []
    for q in values or ["none"]:
        if q.lower() == "none":
            out.append(None)
        elif q in ("4", "8"):
            out.append(int(q))
        else:
            raise NanochatError(f"unsupported quantization {q!r} (choose 4 or 8)")
    return tuple(out)


def _compare(values: list[str], reference_repo: Path | None) -> tuple[str, ...]:
    compare = ["mlx-lm", "reference"] if "all" in values else values
    for c in compare:
        if c not in ("mlx-lm", "reference"):
            raise NanochatError(f"unknown --compare {c!r} (choose mlx-lm, reference)")
    if "reference" in compare:
        if importlib.util.find_spec("torch") is None:
            raise NanochatError("--compare reference needs PyTorch")
        if reference_repo is None:
            raise NanochatError(
                "--compare reference needs --reference-repo DIR: a checkout of karpathy/nanochat at the "
                "commit of the generation under test"
            )
        if not (reference_repo / "nanochat" / "gpt.py").is_file():
            raise NanochatError(f"--reference-repo {reference_repo}: no nanochat/gpt.py (not a nanochat checkout)")
    return tuple(compare)


def _main(args: argparse.Namespace) -> int:
    from ..options import DTYPES

    dtypes = tuple(_split(args.dtype) or ["float32"])
    for d in dtypes:
        if d not in DTYPES:
            raise NanochatError(f"unknown dtype {d!r} (choose {', '.join(DTYPES)})")
    quantize = _quantize(_split(args.quantize))
    if args.serve:
        return _serve(args)
    compare = _compare(_split(args.compare), args.reference_repo)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    backends: tuple[str, ...] = (args.backend,)
    if args.backend == "all":
        backends = ("mlx", "torch") if importlib.util.find_spec("torch") else ("mlx",)
        if backends == ("mlx",):
            print("note: the torch backend needs PyTorch; measuring MLX only", file=sys.stderr)
    if args.source:
        ckpt = read_checkpoint(args.source, step=args.step, arch=args.arch)
        geometry = f"{Path(args.source).name or args.source} (n_layer={ckpt.config.n_layer})"
    else:
        from ..synthetic import random_checkpoint

        geometry = args.geometry or "d12"
        print(f"building random {geometry} weights ({args.arch or 'g9'})", file=sys.stderr)
        ckpt = random_checkpoint(geometry, arch=args.arch or "g9", seed=args.seed)
    if args.prompt_tokens:
        lengths = tuple(int(x) for x in args.prompt_tokens.split(","))
    else:
        lengths = (128,) if args.quick else (128, 1024)
    decode_tokens = args.decode_tokens or (8 if args.quick else 32)
    rows = run_benchmark(
        ckpt,
        geometry=geometry,
        source=args.source,
        backends=backends,
        dtypes=dtypes,
        quantize=quantize,
        compare=compare,
        reference_repo=args.reference_repo,
        prompt_lengths=lengths,
        decode_tokens=decode_tokens,
        trials=args.trials or (1 if args.quick else 3),
    )
    facts = machine_facts(
        rows[0].bandwidth_gbps, rows[0].threads, args.reference_repo if "reference" in compare else None
    )
    table = f"## {geometry}, {ckpt.spec.name}\n\n" + markdown(rows, facts)
    turns = []
    for backend in backends if args.chat_turns > 0 else ():
        words = 12 if args.quick else 60
        t = chat_turn_ttft(ckpt, backend, dtypes[0], args.chat_turns, reply_tokens=decode_tokens, message_words=words)
        turns.append(t)
        table += (
            f"\nChat turn {t['turn']} ({t['backend']}, {t['dtype']}, {t['prompt_tokens']} prompt tokens): time to "
            f"first token {t['ttft_with_cache_s'] * 1000:.0f} ms with the prompt cache ({t['prefilled_with_cache']} "
            f"tokens prefilled) vs {t['ttft_without_cache_s'] * 1000:.0f} ms without "
            f"({t['ttft_without_cache_s'] / max(t['ttft_with_cache_s'], 1e-9):.1f}x)\n"
        )
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    if args.json:
        payload = {"machine": facts, "rows": [asdict(r) for r in rows], "chat_turns": turns}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(rows, args.plot)
    return 0


def _serve(args: argparse.Namespace) -> int:
    """``bench --serve``: the real ``nanochat-mlx serve`` (and ``mlx_lm.server`` with ``--compare mlx-lm``)
    on one random-weight folder, under 1, 2, 4, ... concurrent streaming clients."""
    from ..serve.loadtest import markdown as serve_markdown
    from ..serve.loadtest import run_serve_benchmark

    if args.source:
        raise NanochatError("--serve measures a random-weight --geometry model (the same folder for every server)")
    try:
        levels = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        raise NanochatError(
            f"--concurrency {args.concurrency!r}: expected comma-separated counts like 1,2,4,8"
        ) from None
    rows = run_serve_benchmark(
        geometry=args.geometry or "d12",
        arch=args.arch or "g1",
        backend="torch" if args.backend == "all" else args.backend,
        concurrency=levels,
        compare=tuple(_split(args.compare)),
        max_tokens=args.decode_tokens or 64,
        threads=args.torch_threads,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    table = serve_markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    if args.json:
        from .run import memory_bandwidth_gbps

        threads = args.torch_threads or 1
        payload = {"machine": machine_facts(memory_bandwidth_gbps(threads), threads), "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0
