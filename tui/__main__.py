"""``python -m tui [SOURCE] [--backend B]``: the chat app with default sampling, without the CLI (for development)."""

from __future__ import annotations

import sys

from nanochat_mlx.options import LoadOptions
from nanochat_mlx.sampling import SamplingParams
from nanochat_mlx.userconfig import default_source

from .app import run_tui

if __name__ == "__main__":
    args = sys.argv[1:]
    backend = "auto"
    if "--backend" in args:
        i = args.index("--backend")
        backend = args[i + 1]
        del args[i : i + 2]
    source = args[0] if args else default_source()
    sys.exit(run_tui(LoadOptions(source, backend=backend), params=SamplingParams()))
