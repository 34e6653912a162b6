"""The ``nanochat-mlx`` command: one-shot prompts, a REPL, and the tui/info/convert/bench tools.

stdout carries only the assistant's reply (so one-shot output composes in pipes); notes,
progress and stats go to stderr. Errors are one line and a non-zero exit (``--debug`` for the
traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable

from .errors import NanochatError
from .sampling import SamplingParams
from .sources import DEFAULT_SOURCE

COMMANDS = ("chat", "tui", "info", "convert", "bench", "serve")


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help=f"folder, hf:owner/name[/sub][@rev], nanochat:sft[/tag] (default {DEFAULT_SOURCE})",
    )
    g.add_argument("--step", type=int, help="checkpoint step (default: the highest)")
    g.add_argument("--arch", help="architecture generation g1..g9 when the files can't tell (g5/g6/g7)")
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    g.add_argument("--quantize", type=int, choices=(4, 8), help="quantize weights to 4 or 8 bits (MLX)")
    g.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "mlx", "torch"),
        help="auto: MLX on Apple Silicon, else torch if installed",
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "-t", "--temp", "--temperature", dest="temperature", type=float, default=0.6, help="0 = greedy (default 0.6)"
    )
    g.add_argument("-k", "--top-k", type=int, default=50, help="0 = off (default 50)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=256, help="reply length limit (default 256)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--system", help="system prompt (merged into the first user message, as nanochat does)")


def build_parser() -> dict[str, argparse.ArgumentParser]:
    chat = argparse.ArgumentParser(
        prog="nanochat-mlx",
        description="Chat with a nanochat model (one-shot with -p, else a REPL). "
        "Other commands: tui, info, convert, bench, serve.",
    )
    chat.add_argument("-p", "--prompt", help="one-shot prompt ('-' reads stdin); prints only the reply")
    chat.add_argument("--stats", action="store_true", help="print speed and memory stats to stderr")
    _model_options(chat)
    _sampling_options(chat)
    tui = argparse.ArgumentParser(prog="nanochat-mlx tui", description="The terminal chat app")
    _model_options(tui)
    _sampling_options(tui)
    info = argparse.ArgumentParser(prog="nanochat-mlx info", description="Describe a checkpoint")
    info.add_argument("source", nargs="?", default=DEFAULT_SOURCE)
    info.add_argument("--step", type=int)
    info.add_argument("--arch")
    info.add_argument("--backend", default="auto", choices=("auto", "mlx", "torch"))
    info.add_argument("--debug", action="store_true")
    convert = argparse.ArgumentParser(
        prog="nanochat-mlx convert", description="Write an MLX-native folder (config.json + safetensors + tokenizer)"
    )
    convert.add_argument("source")
    convert.add_argument("out")
    convert.add_argument("--step", type=int)
    convert.add_argument("--arch")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    convert.add_argument("--quantize", type=int, choices=(4, 8))
    convert.add_argument("--debug", action="store_true")
    return {"chat": chat, "tui": tui, "info": info, "convert": convert}


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "chat"
    if command == "bench":
        from .bench import main as bench_main

        return _guarded(lambda: bench_main(argv), debug="--debug" in argv)
    if command == "serve":
        from .serve import main as serve_main

        return _guarded(lambda: serve_main(argv), debug="--debug" in argv)
    args = build_parser()[command].parse_args(argv)
    run: Callable[[], int] = {"chat": _chat, "tui": _tui, "info": _info, "convert": _convert}[command].__get__(args)  # type: ignore[attr-defined]
    return _guarded(run, debug=args.debug)


def _guarded(run: Callable[[], int], debug: bool) -> int:
    """Run a command; user errors become one line on stderr and exit status 1."""
    try:
        return run()
    except NanochatError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - never a traceback unless asked for
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


# --- commands -----------------------------------------------------------------------------------


def _load_session(args: argparse.Namespace):
    """Options checked up front, then model, engine and session."""
    from .backends import pick_backend
    from .checkpoint import read_checkpoint, warn
    from .engine import Engine
    from .loading import build_model, check_options
    from .session import ChatSession

    params = sampling_params(args)
    check_options(args.dtype, args.quantize)
    backend = pick_backend(args.backend)
    if sys.stderr.isatty():
        print(f"loading {args.source} ...", file=sys.stderr)
    ckpt = read_checkpoint(args.source, step=args.step, arch=args.arch)
    warn(ckpt.notes)
    model = build_model(ckpt, dtype=args.dtype, quantize=args.quantize, backend=backend)
    engine = Engine(model, ckpt.tokenizer)
    return ckpt, ChatSession(engine, system_prompt=args.system, params=params)


def _describe(ckpt, session) -> str:
    r = session.engine.runner
    quant = f", {session.engine.model.quantization}-bit" if getattr(session.engine.model, "quantization", None) else ""
    return f"{ckpt.name} ({ckpt.spec.name}, {ckpt.n_params / 1e6:.1f}M params) on {r.name} {r.device} {r.dtype}{quant}"


def _chat(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    # Validate every option before the (slow) model load.
    sampling_params(args)
    ckpt, session = _load_session(args)
    if prompt is not None:
        return _one_shot(session, prompt, args.stats, _describe(ckpt, session))
    return _repl(session, args.stats, _describe(ckpt, session))


def _stream_reply(session, text: str) -> None:
    """Print the reply as it streams; notices (dropped turns) go to stderr first."""
    events = session.stream(text)
    try:
        for event in events:
            for notice in session.notices:
                print(f"note: {notice}", file=sys.stderr)
            session.notices.clear()
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    finally:
        events.close()
        sys.stdout.write("\n")
        sys.stdout.flush()


def _one_shot(session, prompt: str, stats: bool, description: str) -> int:
    _stream_reply(session, prompt)
    if stats:
        print(f"{description}\n{session.last_stats.summary()}", file=sys.stderr)
    return 0


def _repl(session, stats: bool, description: str) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    print(
        f"{description}\nType a message; 'clear' resets, 'quit' or Ctrl-D exits, Ctrl-C stops a reply.", file=sys.stderr
    )
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("quit", "exit"):
            return 0
        if text == "clear":
            session.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            _stream_reply(session, text)
        except KeyboardInterrupt:
            print("(stopped)", file=sys.stderr)
            continue
        if stats and session.last_stats:
            print(session.last_stats.summary(), file=sys.stderr)


def _tui(args: argparse.Namespace) -> int:
    from tui.app import run_tui

    return run_tui(
        args.source,
        step=args.step,
        arch=args.arch,
        dtype=args.dtype,
        quantize=args.quantize,
        backend=args.backend,
        params=sampling_params(args),
        system=args.system,
        debug=args.debug,
    )


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import read_checkpoint

    ckpt = read_checkpoint(args.source, step=args.step, arch=args.arch)
    c, spec = ckpt.config, ckpt.spec
    windows = c.window_sizes(spec)
    dtypes = Counter(str(w.dtype) for w in ckpt.weights.values())
    lines = [
        f"source:       {ckpt.name}",
        f"layout:       {ckpt.files.layout}" + (f", step {ckpt.files.step}" if ckpt.files.step is not None else ""),
        *(
            f"file:         {p}"
            for p in [*ckpt.files.weights, ckpt.files.meta or ckpt.files.config, ckpt.files.tokenizer]
            if p
        ),
        f"generation:   {spec.name}: {spec.summary}",
        f"decided by:   {ckpt.how}",
        f"config:       n_layer={c.n_layer} n_embd={c.n_embd} n_head={c.n_head} n_kv_head={c.n_kv_head} "
        f"head_dim={c.head_dim} sequence_len={c.sequence_len} vocab_size={c.vocab_size} (rows {c.padded_vocab_size})",
        f"parameters:   {ckpt.n_params:,}",
        f"windows:      {'none (full causal)' if windows[0] is None else ', '.join(str(w) for w in windows)}"
        + (f"  (pattern {c.window_pattern})" if spec.windowed else ""),
        f"value embeds: {c.ve_layers(spec) or 'none'}",
        f"dtypes:       {', '.join(f'{n} {d}' for d, n in sorted(dtypes.items()))} tensors",
        f"rotary:       base {spec.rope_base:g}, {'bfloat16' if spec.rope_table_bf16 else 'float32'} tables; "
        f"softcap {spec.softcap:g}",
        f"tokenizer:    {ckpt.tokenizer.vocab_size} tokens, bos {ckpt.tokenizer.get_bos_token_id()}",
        f"context:      {c.sequence_len} trained, {c.rope_len} max",
        f"backend:      {_backend_and_device(args.backend)}",
    ]
    if ckpt.quantization:
        lines.append(f"quantization: {ckpt.quantization['bits']}-bit, group {ckpt.quantization['group_size']}")
    lines += [f"note:         {n}" for n in ckpt.notes]
    print("\n".join(lines))
    return 0


def _backend_and_device(requested: str) -> str:
    """Which backend ``requested`` resolves to here, on which device with which default dtype."""
    from .backends import pick_backend

    name = pick_backend(requested)
    if name == "torch":
        from .backends.torch.model import default_device, default_dtype

        device = default_device()
        return f"torch on {device.type}, {default_dtype(device)} ({requested})"
    from .backends.mlx.model import default_dtype, device_name

    return f"mlx on {device_name()}, {default_dtype()} ({requested})"


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(args.source, args.out, step=args.step, arch=args.arch, dtype=args.dtype, quantize=args.quantize)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
