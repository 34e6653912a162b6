"""``python -m nanochat_mlx.bench``: the same as ``nanochat-mlx bench``."""

from . import main

raise SystemExit(main())
