"""Which models there are to chat with: ``discover()`` for the model picker, ``nanochat-mlx models``.

Five groups, in this order: the built-in demo; nanochat checkpoints already in the Hugging Face
cache (``huggingface_hub.scan_cache_dir``: one entry per checkpoint folder of each cached
snapshot); checkpoints in the nanochat base dir (``$NANOCHAT_BASE_DIR`` or ``~/.cache/nanochat``:
``base_checkpoints/``, ``mid_checkpoints/``, ``chatsft_checkpoints/``, ``chatrl_checkpoints/``);
local folders named on the command line; and known Hub repos to download (not yet cached), with
estimated sizes. Every entry's ``source`` is what ``--source`` takes. Nothing here downloads.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .demo import MODEL_DIR, demo_meta
from .demo import SOURCE as DEMO_SOURCE
from .errors import NanochatError
from .sources import PHASE_DIRS, base_dir_source, nanochat_base_dir, resolve
from .userconfig import is_local_source, last_source

GROUPS = {
    "built-in": "built-in (offline)",
    "hub-cache": "in the Hugging Face cache",
    "base-dir": "in the nanochat base dir",
    "folder": "folders",
    "download": "to download from the Hugging Face Hub (sizes estimated)",
}
_MODEL = re.compile(r"^model(?:_(\d+))?\.(pt|safetensors)$")


@dataclass(frozen=True)
class KnownRepo:
    repo: str
    about: str
    params: float  # parameters
    size_bytes: int  # estimated download: wte in bfloat16, the other weights in float32 (as nanochat saves them)


# Public nanochat checkpoints. Sizes are estimates from each geometry, not measured downloads.
KNOWN_REPOS = (
    KnownRepo("karpathy/nanochat-d32", "Karpathy's d32 chat model (SFT), native layout", 1.88e9, int(7.3e9)),
    KnownRepo("Antigma/nanochat-d32", "the same d32 model, as nanochat-rs loads it", 1.88e9, int(7.3e9)),
    KnownRepo("nanochat-students/nanochat-d20", "the $100 d20 chat model, transformers layout", 5.61e8, int(2.1e9)),
    KnownRepo("nanochat-students/base-d20", "the d20 base (pretrained) model, native layout", 5.61e8, int(2.1e9)),
    KnownRepo("nanochat-students/rl-d20", "the d20 model after RL on GSM8K, native layout", 5.61e8, int(2.1e9)),
)


@dataclass(frozen=True)
class ModelChoice:
    """One model the user can pick."""

    source: str  # what --source takes
    group: str  # a key of GROUPS
    detail: str  # facts for people: layout, step, geometry, quality
    size_bytes: int | None = None  # on disk, or (for "download") the estimated download
    last_used: bool = False
    problem: str | None = None  # set when a folder given is not a loadable checkpoint

    @property
    def downloaded(self) -> bool:
        return self.group != "download"


def discover(folders: list[str] | tuple[str, ...] = (), last: str | None = None) -> list[ModelChoice]:
    """Every model there is to pick, grouped as ``GROUPS``; ``last`` (a source) is marked last used,
    and listed too when it is a folder not given."""
    given = {_same(f) for f in folders}
    if last and is_local_source(last) and _same(last) not in given and Path(last).expanduser().exists():
        folders = [*folders, last]
    choices = [demo_choice(), *hub_cache_choices(), *base_dir_choices(), *(folder_choice(f) for f in folders)]
    cached_repos = {"/".join(c.source.removeprefix("hf:").split("/")[:2]) for c in choices if c.group == "hub-cache"}
    choices += [download_choice(k) for k in KNOWN_REPOS if k.repo not in cached_repos]
    chosen = _chosen(last, [c.source for c in choices])
    return [ModelChoice(**{**asdict(c), "last_used": c.source == chosen}) for c in choices]


def _same(source: str) -> str:
    """What ``source`` runs, spelled one way: a folder as its absolute path, ``nanochat:sft`` with its tag."""
    if is_local_source(source):
        return str(Path(source).expanduser().resolve())
    return base_dir_source(source)


def _chosen(last: str | None, sources: list[str]) -> str | None:
    """The listed source that ``last`` runs (a Hub repo: its one cached checkpoint folder)."""
    if last is None:
        return None
    target = _same(last)
    same = [s for s in sources if _same(s) == target]
    if same:
        return same[0]
    within = [s for s in sources if s.startswith(last.rstrip("/") + "/")]
    return within[0] if last.startswith("hf:") and len(within) == 1 else None


def demo_choice() -> ModelChoice:
    figures = demo_meta().get("figures") or {}
    arithmetic = (figures.get("arithmetic") or {}).get("accuracy")
    facts = ["tiny g9 model trained on a CPU: arithmetic with a calculator, spelling, a little chat"]
    if arithmetic is not None:
        facts.append(f"{arithmetic:.0%} on held-out arithmetic")
    return ModelChoice(DEMO_SOURCE, "built-in", "; ".join(facts), _size(MODEL_DIR))


def hub_cache_choices(cache_dir: str | Path | None = None) -> list[ModelChoice]:
    """Each checkpoint folder in the newest cached snapshot of every model repo."""
    import huggingface_hub.constants
    from huggingface_hub import scan_cache_dir

    try:  # the cache dir as huggingface_hub reads it now (scan_cache_dir's default is fixed at import)
        info = scan_cache_dir(cache_dir or huggingface_hub.constants.HF_HUB_CACHE)
    except Exception:  # no cache yet, or one huggingface_hub cannot read: nothing cached to offer
        return []
    choices = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        files = {posixpath.join(*f.file_path.relative_to(revision.snapshot_path).parts) for f in revision.files}
        for folder in checkpoint_folders(files):
            source = f"hf:{repo.repo_id}" + (f"/{folder}" if folder else "")
            size = sum(f.size_on_disk for f in revision.files if _within(f.file_path, revision.snapshot_path, folder))
            choices.append(ModelChoice(source, "hub-cache", _describe_folder(files, folder), size))
    return choices


def checkpoint_folders(files: set[str]) -> list[str]:
    """Folders (repo-relative, "" for the root) that hold a model file or config.json with safetensors."""
    by_dir: dict[str, set[str]] = {}
    for f in files:
        by_dir.setdefault(posixpath.dirname(f), set()).add(posixpath.basename(f))
    return sorted(
        d
        for d, names in by_dir.items()
        if any(_MODEL.match(n) for n in names)
        or ("config.json" in names and any(n.endswith(".safetensors") for n in names))
    )


def base_dir_choices(base: Path | None = None) -> list[ModelChoice]:
    """Every model tag of every phase in the nanochat base dir."""
    base = base or nanochat_base_dir()
    choices = []
    for phase, dirname in PHASE_DIRS.items():
        phase_dir = base / dirname
        if not phase_dir.is_dir():
            continue
        for tag in sorted((d for d in phase_dir.iterdir() if d.is_dir()), key=_tag_order):
            names = {p.name for p in tag.iterdir() if p.is_file()}
            if any(_MODEL.match(n) for n in names):
                source = f"nanochat:{phase}/{tag.name}"
                choices.append(ModelChoice(source, "base-dir", _describe_native(tag), _size(tag)))
    return choices


def folder_choice(folder: str) -> ModelChoice:
    """A folder (or model file) given by the user: what it holds, or why it can't be loaded."""
    try:
        files = resolve(folder)
    except NanochatError as e:
        return ModelChoice(folder, "folder", "not loadable", problem=str(e))
    step = f", step {files.step}" if files.step is not None else ""
    return ModelChoice(folder, "folder", f"{files.layout} layout{step}", sum(p.stat().st_size for p in files.weights))


def download_choice(known: KnownRepo) -> ModelChoice:
    detail = f"{known.about}; {known.params / 1e9:.2g}B params"
    return ModelChoice(f"hf:{known.repo}", "download", detail, known.size_bytes)


# --- helpers ------------------------------------------------------------------------------------


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _within(path: Path, root: Path, folder: str) -> bool:
    parent = posixpath.join(*path.relative_to(root).parts[:-1]) if len(path.relative_to(root).parts) > 1 else ""
    return parent == folder


def _tag_order(tag: Path) -> tuple:
    m = re.fullmatch(r"d(\d+)", tag.name)
    return (0, int(m.group(1)), "") if m else (1, 0, tag.name)


def _latest_step(names: set[str]) -> int | None:
    steps = [int(m.group(1)) for n in names if (m := _MODEL.match(n)) and m.group(1)]
    return max(steps) if steps else None


def _describe_folder(files: set[str], folder: str) -> str:
    names = {posixpath.basename(f) for f in files if posixpath.dirname(f) == folder}
    if not any(_MODEL.match(n) for n in names):
        return "config.json + safetensors layout"
    step = _latest_step(names)
    return "native layout" + (f", step {step}" if step is not None else "")


def _describe_native(folder: Path) -> str:
    names = {p.name for p in folder.iterdir()}
    step = _latest_step(names)
    facts = ["native layout" + (f", step {step}" if step is not None else "")]
    meta_name = f"meta_{step:06d}.json" if step is not None else "meta.json"
    try:
        config = json.loads((folder / meta_name).read_text(encoding="utf-8"))["model_config"]
        facts.append(f"n_layer {config['n_layer']}, n_embd {config['n_embd']}, vocab {config['vocab_size']}")
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass
    return "; ".join(facts)


def human_size(n: int | None, estimated: bool = False) -> str:
    if n is None:
        return ""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{'~' if estimated else ''}{n / scale:.1f} {unit}"
    return f"{n} B"


def render(choices: list[ModelChoice]) -> str:
    """The listing ``nanochat-mlx models`` prints."""
    width = max((len(c.source) for c in choices), default=0) + 2
    lines = []
    for group, title in GROUPS.items():
        members = [c for c in choices if c.group == group]
        if not members:
            continue
        lines.append(f"{title}:")
        for c in members:
            mark = "*" if c.last_used else " "
            size = human_size(c.size_bytes, estimated=not c.downloaded)
            detail = c.problem or ", ".join(x for x in (size, c.detail) if x)
            lines.append(f" {mark} {c.source:<{width}}{detail}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from .cli import Parser

    p = Parser(
        prog="nanochat-mlx models",
        description="List the models to chat with: the built-in demo, cached Hub repos, nanochat base-dir "
        "checkpoints, the FOLDERs given, and known Hub repos to download. * marks the one chosen last.",
    )
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="local checkpoint folders to describe too")
    p.add_argument("--json", action="store_true", help="one JSON object per model instead of the table")
    args = p.parse_args(argv)
    choices = discover(args.folders, last=last_source())
    if args.json:
        for c in choices:
            print(json.dumps({**asdict(c), "downloaded": c.downloaded}))
    else:
        print(render(choices))
        print("\nchat with one: nanochat-mlx --source SOURCE (it is remembered as the default)")
    return 0 if not any(c.problem for c in choices) else 1
