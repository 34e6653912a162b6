"""The user's settings: which model they chose last (``config.json`` in the user config dir).

The file lives in ``platformdirs.user_config_dir("nanochat-mlx")`` (``$NANOCHAT_MLX_CONFIG_DIR``
overrides it). It is written atomically (a temporary file renamed over it), and a missing,
unreadable or hand-mangled file counts as empty: settings are never a reason to fail a chat.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .demo import REAL_MODEL_HINT
from .demo import SOURCE as DEMO_SOURCE

CONFIG_FILE = "config.json"
SOURCE_KEY = "last_source"


def config_dir() -> Path:
    override = os.environ.get("NANOCHAT_MLX_CONFIG_DIR")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("nanochat-mlx"))


def config_path() -> Path:
    return config_dir() / CONFIG_FILE


def load_config() -> dict[str, Any]:
    """The settings, or {} when the file is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(config_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def save_config(data: dict[str, Any]) -> bool:
    """Write the settings atomically; False (and nothing changed) when the folder can't be written."""
    path = config_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        return False
    return True


def last_source() -> str | None:
    """The source the user chose last, if it is still usable (a local one must still exist)."""
    source = load_config().get(SOURCE_KEY)
    if not isinstance(source, str) or not source.strip():
        return None
    if is_local_source(source) and not Path(source).expanduser().exists():
        return None
    return source


def default_source() -> str:
    """What to load when no ``--source`` is given: the model chosen last, else the demo."""
    return last_source() or DEMO_SOURCE


def remember_source(source: str) -> bool:
    """Record ``source`` as the user's choice (local paths made absolute); False if it can't be saved."""
    if is_local_source(source):
        source = str(Path(source).expanduser().resolve())
    data = load_config()
    if data.get(SOURCE_KEY) == source:
        return True
    return save_config({**data, SOURCE_KEY: source})


def default_source_hint(source: str) -> str | None:
    """The one line to print on stderr when ``source`` is the demo picked by default."""
    if source != DEMO_SOURCE:
        return None
    return f"note: chatting with the built-in demo model (tiny); {REAL_MODEL_HINT}"


def is_local_source(source: str) -> bool:
    """Not a scheme source (``hf:``, ``nanochat:``) nor the demo: a folder or file path."""
    return source != DEMO_SOURCE and not source.startswith(("hf:", "nanochat:"))
