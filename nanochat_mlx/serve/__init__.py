"""``nanochat-mlx serve``: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

The server binds and answers /health (503) at once; the model loads on the scheduler's model
thread, which then runs every forward pass (see ``scheduler``).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import NanochatError
from .protocol import Limits


def build_parser() -> argparse.ArgumentParser:
    from ..cli import Parser, model_options_parent
    from .scheduler import PREFILL_CHUNK

    p = Parser(
        prog="nanochat-mlx serve",
        parents=[model_options_parent()],
        description="Serve a model over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models) "
        "with a web chat page at /",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: none, any accepted)")
    g.add_argument(
        "--allowed-origins", nargs="*", default=[], metavar="ORIGIN", help="origins allowed by CORS ('*' for any)"
    )
    g.add_argument(
        "--strict-model",
        action="store_true",
        help="answer 404 when a request names another model (default: the loaded model answers any name, "
        "as llama.cpp's server does, so clients with a fixed model name work)",
    )
    g.add_argument("--max-concurrency", type=int, default=8, help="rows decoded together in one batch (default 8)")
    g.add_argument("--queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    g.add_argument("--prompt-cache-mb", type=int, default=1024, help="KV prefixes kept across requests (default 1024)")
    g.add_argument(
        "--prefill-chunk",
        type=int,
        default=PREFILL_CHUNK,
        help=f"prompt tokens run per step, alone or riding along the decoding rows' step (default {PREFILL_CHUNK})",
    )
    limits = p.add_argument_group("limits (nanochat's chat server defaults)")
    defaults = Limits()
    limits.add_argument("--max-messages", type=int, default=defaults.max_messages)
    limits.add_argument("--max-message-chars", type=int, default=defaults.max_message_chars)
    limits.add_argument("--max-total-chars", type=int, default=defaults.max_total_chars)
    limits.add_argument("--max-completion-tokens", type=int, default=defaults.max_tokens)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..cli import load_options

    args = build_parser().parse_args(argv)
    options = load_options(args)  # checked before the server starts
    if args.max_concurrency < 1 or args.queue < 1 or args.prefill_chunk < 1:
        raise NanochatError("--max-concurrency, --queue and --prefill-chunk must be at least 1")
    import uvicorn

    from ..loading import load_model
    from .app import SHUTDOWN_GRACE_S, Server, ServerConfig, build_app
    from .scheduler import Scheduler

    def load():
        try:
            loaded = load_model(options)
        except BaseException:
            server.should_exit = True  # a model that cannot load ends the command (one-line error below)
            raise
        print(f"nanochat-mlx serve: {loaded.description}", file=sys.stderr, flush=True)
        return loaded.engine

    scheduler = Scheduler(load, max_rows=args.max_concurrency, max_queue=args.queue,
                          cache_bytes=args.prompt_cache_mb << 20, prefill_chunk=args.prefill_chunk)  # fmt: skip
    limits = Limits(
        max_messages=args.max_messages,
        max_message_chars=args.max_message_chars,
        max_total_chars=args.max_total_chars,
        max_tokens=args.max_completion_tokens,
    )
    config = ServerConfig(options.source, args.api_key, tuple(args.allowed_origins), limits, args.strict_model)
    app = build_app(scheduler, config)
    # No lifespan events (the app has none). The server cancels replies SHUTDOWN_GRACE_S after Ctrl-C;
    # uvicorn's own deadline, later, is only a backstop.
    uconfig = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="off",
                             timeout_graceful_shutdown=SHUTDOWN_GRACE_S + 3)  # fmt: skip
    server = Server(uconfig, scheduler)
    scheduler.start()
    print(f"nanochat-mlx serve: http://{args.host}:{args.port} (loading {options.source})", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        scheduler.stop()
    if scheduler.error:
        raise NanochatError(scheduler.error)
    return 0 if server.started else 1
