"""The ``nanochat-mlx`` command: one-shot prompts, a REPL, and the tui/info/convert/bench tools.

stdout carries only the assistant's reply (so one-shot output composes in pipes); notes,
progress and stats go to stderr. Errors are one line and a non-zero exit (``--debug`` for the
traceback). Every command takes its model options from one argparse parent and validates them
through :class:`~nanochat_mlx.options.LoadOptions`, so each mistake gets the same message.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from . import __version__, stdio
from .errors import NanochatError
from .options import BACKENDS, DTYPES, QUANT_BITS, LoadOptions, finite
from .sampling import SamplingParams
from .stdio import StdoutError

COMMANDS = ("chat", "tui", "info", "convert", "bench", "serve", "sft", "models")
EXTERNAL_COMMANDS = {"bench": ".bench", "serve": ".serve", "sft": ".training.sft", "models": ".models"}  # own parsers
PHASES = ("base", "mid", "sft", "rl")  # the reference chat CLI's -i/--source values
DEFAULT_HELP = "the model you chose last, else the built-in demo"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away, not dumped on every typo)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str) -> float:
    """argparse type for finite floats (``float`` would take nan and inf)."""
    try:
        return finite("value", text)
    except NanochatError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None


def model_options_parent(source: str = "option") -> argparse.ArgumentParser:
    """The model options every command shares. ``source``: "option" (``--source``) or "positional"."""
    parent = Parser(add_help=False)
    g = parent.add_argument_group("model")
    if source == "positional":
        g.add_argument("source_arg", nargs="?", metavar="source", help=f"the checkpoint (default: {DEFAULT_HELP})")
        g.add_argument("--source", "--model", "-i", help="the checkpoint, spelt as the other commands take it")
    else:
        g.add_argument(
            "--source",
            "--model",
            "-i",
            help="folder, hf:owner/name[/sub][@rev], nanochat:sft[/tag], a phase (base, mid, sft, rl) "
            f"of the nanochat base dir, or demo (default: {DEFAULT_HELP})",
        )
        g.add_argument("-g", "--model-tag", help="with a phase: the model tag in the base dir, e.g. d20")
    g.add_argument("-s", "--step", type=int, help="checkpoint step (default: the highest)")
    g.add_argument("--arch", help="architecture generation g1..g9 when the files can't tell (g5/g6/g7)")
    g.add_argument(
        "--dtype", choices=DTYPES, help="compute dtype (default: float32 on CPU, bfloat16 on GPU; convert: float32)"
    )
    g.add_argument(
        "--quantize", type=int, choices=QUANT_BITS, help="quantize weights: 4 or 8 bits (MLX affine; torch weight-only)"
    )
    g.add_argument(
        "--backend", default="auto", choices=BACKENDS, help="auto: MLX on Apple Silicon, else torch if installed"
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    return parent


def sampling_options_parent() -> argparse.ArgumentParser:
    parent = Parser(add_help=False)
    g = parent.add_argument_group("sampling")
    g.add_argument(
        "-t", "--temp", "--temperature", dest="temperature", type=_number, default=0.6, help="0 = greedy (default 0.6)"
    )
    g.add_argument("-k", "--top-k", type=int, default=50, help="0 = off (default 50)")
    g.add_argument("--top-p", type=_number, default=1.0, help="nucleus sampling mass (default 1 = off)")
    g.add_argument("--min-p", type=_number, default=0.0, help="drop tokens below min-p x the top one (default 0)")
    g.add_argument("--repetition-penalty", type=_number, default=1.0, help="over the last 20 tokens (default 1 = off)")
    g.add_argument("-m", "--max-tokens", type=int, default=256, help="reply length limit (default 256)")
    g.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    g.add_argument(
        "--system",
        "--system-prompt",
        dest="system",
        help="system prompt (merged into the first user message, as nanochat does)",
    )
    return parent


def build_parser() -> dict[str, argparse.ArgumentParser]:
    model, sampling = model_options_parent(), sampling_options_parent()
    positional = model_options_parent("positional")
    chat = Parser(
        prog="nanochat-mlx",
        parents=[model, sampling],
        description="Chat with a nanochat model (one-shot with -p, else a REPL). "
        "Other commands: tui, info, convert, bench, serve, sft, models (nanochat-mlx COMMAND --help).",
    )
    chat.add_argument("--version", action="version", version=f"nanochat-mlx {__version__}")
    chat.add_argument("-p", "--prompt", help="one-shot prompt ('-' reads stdin); prints only the reply")
    chat.add_argument("--stats", action="store_true", help="print speed and memory stats to stderr")
    tui = Parser(prog="nanochat-mlx tui", parents=[model, sampling], description="The terminal app")
    info = Parser(
        prog="nanochat-mlx info",
        parents=[positional],
        description="Describe a checkpoint: files, generation (and why), config, windows, dtypes, backend",
    )
    convert = Parser(
        prog="nanochat-mlx convert",
        parents=[positional],
        description="Write an MLX-native folder (config.json + safetensors + tokenizer) from any checkpoint",
    )
    convert.add_argument("out", help="the folder to write (must not exist, or be empty)")
    return {"chat": chat, "tui": tui, "info": info, "convert": convert}


def load_options(args: argparse.Namespace) -> LoadOptions:
    """The validated model options of a parsed command line. Without a source: the model chosen last,
    else the built-in demo (with a one-line hint on how to get a real model)."""
    from .userconfig import default_source, default_source_hint

    source, tag = _given_source(args), getattr(args, "model_tag", None)
    if tag is not None:
        source = _base_dir_source(source, tag)
    elif source is None:
        source = default_source()
        hint = default_source_hint(source)
        if hint:
            print(hint, file=sys.stderr)
    elif source in PHASES and not Path(source).exists():
        source = f"nanochat:{source}"
    return LoadOptions(source, args.step, args.arch, args.dtype, args.quantize, args.backend)


def _given_source(args: argparse.Namespace) -> str | None:
    """The source of the command line: ``info``/``convert`` take it as the first argument or as
    ``--source``, like the other commands, but once."""
    positional = getattr(args, "source_arg", None)
    if positional is not None and args.source is not None and positional != args.source:
        raise NanochatError(f"two sources given, {positional} and --source {args.source}: give one")
    return args.source if positional is None else positional


def names_a_model(args: argparse.Namespace) -> bool:
    """Whether the command line named a model (rather than taking the remembered default)."""
    return args.source is not None or getattr(args, "model_tag", None) is not None


def _base_dir_source(source: str | None, tag: str) -> str:
    """``-g TAG`` with ``-i PHASE`` (default sft, as the reference's chat CLI): ``nanochat:PHASE/TAG``."""
    if not tag.strip() or "/" in tag:
        raise NanochatError(f"-g/--model-tag takes a model folder's name such as d20, got {tag!r}")
    phase = "sft" if source is None else source.removeprefix("nanochat:")
    phase, _, named = phase.partition("/")
    if phase in PHASES and named not in ("", tag):
        raise NanochatError(f"-g/--model-tag {tag} conflicts with the tag in --source {source}: give one of them")
    if phase not in PHASES:
        raise NanochatError(
            "-g/--model-tag picks a checkpoint of the nanochat base dir: use it with -i base|mid|sft|rl, "
            f"not with --source {source}"
        )
    return f"nanochat:{phase}/{tag}"


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
    stdio.install()
    _catch_interrupts()
    # Everything from here, imports and parsing included, runs inside the guard: a Ctrl-C at
    # startup is a quiet exit 130 like any other.
    return _guarded(lambda: _run_command(command, argv), debug="--debug" in argv)


def _run_command(command: str, argv: list[str]) -> int:
    if command in EXTERNAL_COMMANDS:
        module = importlib.import_module(EXTERNAL_COMMANDS[command], __package__)
        return module.main(argv)
    args = build_parser()[command].parse_args(argv)
    run: Callable[[argparse.Namespace], int] = {"chat": _chat, "tui": _tui, "info": _info, "convert": _convert}[command]
    return run(args)


class _Interrupts:
    """The SIGINT handler: Python's own (KeyboardInterrupt), and it remembers. A Ctrl-C that lands
    inside a C extension's import can come out as another error (an ImportError): that is still
    the user's Ctrl-C, and gets its quiet exit."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt


INTERRUPTS = _Interrupts()


def _catch_interrupts() -> None:
    INTERRUPTS.seen = False
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        signal.signal(signal.SIGINT, INTERRUPTS)


def _guarded(run: Callable[[], int], debug: bool) -> int:
    """Run a command; user errors become one line on stderr and exit status 1."""
    try:
        code = run()
        sys.stdout.flush()  # here, so a full disk is reported like any error, not at the exit
        return code
    except BrokenPipeError:  # `nanochat-mlx -p ... | head -n 1`: the reader left, as Unix tools exit
        _silence_stdout()
        return 0
    except StdoutError as e:
        _silence_stdout()  # what is still buffered would fail again at the exit
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
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
        if INTERRUPTS.seen:  # the Ctrl-C broke something on its way (see _Interrupts)
            print(file=sys.stderr)
            return 130
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's exit flush can't raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


# --- commands -----------------------------------------------------------------------------------


def _load(options: LoadOptions):
    from .backends import backend_hint
    from .checkpoint import warn
    from .loading import load_model

    if sys.stderr.isatty():
        print(f"loading {options.source} ...", file=sys.stderr)
    loaded = load_model(options)
    warn(loaded.checkpoint.notes)
    hint = backend_hint(loaded.backend, loaded.device)
    if hint:
        print(f"note: {hint}", file=sys.stderr)
    return loaded


def _chat(args: argparse.Namespace) -> int:
    from .session import ChatSession
    from .userconfig import remember_source

    # Validate every option before the (slow) model load.
    options, params = load_options(args), sampling_params(args)
    _check_streams(args.prompt)
    prompt = _check_prompt(args.prompt)
    loaded = _load(options)
    if prompt == "-":  # read after the load: the model's context bounds how much is worth reading
        prompt = _check_prompt(_read_stdin_prompt(loaded))
    if names_a_model(args):  # an explicit choice becomes the default of the next run
        remember_source(options.source)
    session = ChatSession(loaded.engine, system_prompt=args.system, params=params)
    if prompt is not None:
        _stream_reply(session, prompt)
        if args.stats:
            print(f"{loaded.description}\n{session.last_stats.summary()}", file=sys.stderr)
        return 0
    return _repl(session, args.stats, loaded.description)


def _check_prompt(prompt: str | None) -> str | None:
    if prompt is not None and not prompt.strip():
        raise NanochatError("the prompt is empty: give -p TEXT, or -p - with text on stdin")
    return prompt


def _read_stdin_prompt(loaded) -> str:
    """stdin, read no further than a prompt that fits the context could go (``< /dev/zero`` is
    refused at once, not after filling the memory): each token stands for at most the longest
    token's bytes, so more than context x longest bytes can't be under the context."""
    context = loaded.engine.context_limit
    longest = loaded.tokenizer.longest_token_bytes
    data = sys.stdin.buffer.read(context * longest + 1)
    if len(data) > context * longest:
        raise NanochatError(f"the prompt on stdin is longer than the model's context ({context} tokens)")
    return data.decode(sys.stdin.encoding or "utf-8", errors="replace")


def _check_streams(prompt: str | None) -> None:
    """Refuse, before the load, a chat whose standard streams were closed."""
    if stdio.closed_at_start(sys.stdout):
        raise StdoutError("stdout is closed: the reply has nowhere to go")
    if stdio.closed_at_start(sys.stdin) and prompt in (None, "-"):
        reader = "-p - reads the prompt from it" if prompt else "the chat reads your messages from it"
        raise NanochatError(f"stdin is closed: {reader} (give the prompt with -p TEXT)")


def _stream_reply(session, text: str) -> None:
    """Print the reply as it streams; notices (a shorter context) go to stderr first, and a note
    after a reply that the full context cut short (else it would look finished)."""
    events = session.stream(text)
    try:
        for event in events:
            for notice in event.notices:
                print(f"note: {notice}", file=sys.stderr)
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    finally:
        events.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
    if session.last_stats is not None and session.last_stats.stopped == "context":
        context = session.engine.context_limit
        print(f"note: the reply stopped at the end of the model's context ({context} tokens)", file=sys.stderr)


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
            INTERRUPTS.seen = False  # handled: later errors are errors again
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        command = text.lower()  # CLEAR, Quit: a command however it is typed
        if command in ("quit", "exit"):
            return 0
        if command == "clear":
            session.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            _stream_reply(session, text)
        except KeyboardInterrupt:
            INTERRUPTS.seen = False
            print("(stopped)", file=sys.stderr)
            continue
        except NanochatError as e:  # e.g. a message longer than the context: the session goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        if stats and session.last_stats:
            print(session.last_stats.summary(), file=sys.stderr)


def _tui(args: argparse.Namespace) -> int:
    from tui.app import run_tui

    from .userconfig import remember_source

    options = load_options(args)
    code = run_tui(options, params=sampling_params(args), system=args.system, debug=args.debug)
    if code == 0 and names_a_model(args):  # it loaded: the next run starts there
        remember_source(options.source)
    return code


def _info(args: argparse.Namespace) -> int:
    from .backends import describe_backend
    from .checkpoint import read_checkpoint
    from .loading import describe_checkpoint

    options = load_options(args)
    ckpt = read_checkpoint(options.source, step=options.step, arch=options.arch)
    rows = [*describe_checkpoint(ckpt), ("backend", describe_backend(options.backend, ckpt))]
    print("\n".join(f"{label + ':':<13} {value}" for label, value in rows))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    options = load_options(args)
    out = convert(options.source, args.out, step=options.step, arch=options.arch, dtype=options.dtype,
                  quantize=options.quantize)  # fmt: skip
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
