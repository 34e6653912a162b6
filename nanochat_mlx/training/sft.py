"""``nanochat-mlx sft``: supervised fine-tuning (full or LoRA) with the reference's recipe.

The defaults are ``scripts/chat_sft.py``'s at HEAD: learning rates inherited from the checkpoint's
``meta`` (its ``user_config``), ``init_lr_frac`` 0.8, no warmup, a linear warmdown over the last
half to 0, Muon momentum 0.85 -> 0.95 over 300 steps, weight decay 0, one epoch. ``--batch-tokens``
is the global batch: each step takes ``batch_tokens / max_seq_len`` packed rows, split into
micro-batches of ``--device-batch-size`` rows that the processes share (so the losses do not depend
on the number of processes). DIR gets reference checkpoints, ``train_log.jsonl``, ``loss.png``
and the state ``--resume`` continues from.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import NanochatError
from ..fileio import read_json
from ..loading import LoadedModel, load_model
from ..options import LoadOptions
from .data import Dataset, Packer, batch_arrays, eval_rows, read_dataset
from .distributed import World, init_world, sum_arrays
from .evaluate import evaluate
from .rows import RowGrad
from .schedule import LRSchedule, muon_momentum

LOG, PLOT = "train_log.jsonl", "loss.png"
# Hyper-parameters chat_sft inherits from the checkpoint when not given: (name, fallback, where).
INHERITED = (
    ("max_seq_len", 2048, "meta"),
    ("device_batch_size", 32, "meta"),
    ("batch_tokens", 524288, "meta"),
    ("embedding_lr", 0.3, "user_config"),
    ("unembedding_lr", 0.004, "user_config"),
    ("matrix_lr", 0.02, "user_config"),
)
META_NAMES = {"batch_tokens": "total_batch_size"}  # our option name -> the reference's meta key
# Options a resumed run keeps from the first (everything but the horizon and the output).
RESUMABLE = ("steps", "epochs", "eval_every", "save_every", "debug")


def build_parser() -> argparse.ArgumentParser:
    from ..cli import Parser, model_options_parent

    p = Parser(
        prog="nanochat-mlx sft",
        parents=[model_options_parent()],
        description="Fine-tune a checkpoint on a JSONL file ({'messages': [...]}, an array of messages, or "
        "{'text': ...}) with the reference's SFT recipe; writes reference checkpoints to --out.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training JSONL")
    g.add_argument("--val", help="validation JSONL (loss and bits per byte every --eval-every steps)")
    g.add_argument("--strict", action="store_true", help="stop at the first bad line (default: skip and count)")
    g.add_argument("--max-seq-len", type=int, help="row length (default: the checkpoint's, else 2048)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder (checkpoints, train_log.jsonl, loss.png)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR (optionally to a new --steps)")
    g.add_argument("--steps", type=int, default=-1, help="optimizer steps (default -1: --epochs of the data)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is -1 (default 1)")
    g.add_argument("--batch-tokens", type=int, help="global batch in tokens (default: the checkpoint's, else 524288)")
    g.add_argument("--device-batch-size", type=int, help="rows per micro-batch per process (default: checkpoint's)")
    g.add_argument("--seed", type=int, default=42, help="data order and LoRA init (default 42)")
    g.add_argument("--eval-every", type=int, default=200, help="validate every N steps (-1: only at the end)")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (default: at the end)")
    g = p.add_argument_group("optimizer (full fine-tuning: MuonAdamW)")
    g.add_argument("--embedding-lr", type=float, help="default: the checkpoint's, else 0.3")
    g.add_argument("--unembedding-lr", type=float, help="default: the checkpoint's, else 0.004")
    g.add_argument("--matrix-lr", type=float, help="default: the checkpoint's, else 0.02")
    g.add_argument("--init-lr-frac", type=float, default=0.8, help="initial lr as a fraction of the base lr")
    g.add_argument("--warmup-ratio", type=float, default=0.0)
    g.add_argument("--warmdown-ratio", type=float, default=0.5)
    g.add_argument("--final-lr-frac", type=float, default=0.0)
    g = p.add_argument_group("LoRA (with --quantize on MLX: QLoRA)")
    g.add_argument("--lora-rank", type=int, default=0, help="adapter rank (default 0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, help="scale numerator (default 2 x rank)")
    g.add_argument("--lora-layers", type=int, default=-1, help="adapt the last N blocks (default -1: all)")
    g.add_argument("--lora-targets", default="c_q,c_k,c_v,c_proj,c_fc", help="linear layers to adapt")
    g.add_argument("--lr", type=float, default=1e-4, help="LoRA AdamW learning rate (default 1e-4)")
    g.add_argument("--fuse", action="store_true", help="also write the merged weights as a checkpoint")
    return p


@dataclass
class Plan:
    """The resolved run: every hyper-parameter, how the batch splits, where it stands."""

    args: argparse.Namespace
    row_capacity: int
    rows_per_step: int
    micro_batches: int  # per step, over all processes

    @property
    def lora(self) -> bool:
        return self.args.lora_rank > 0


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise NanochatError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return value


def _inherit(args: argparse.Namespace, meta: dict[str, Any]) -> list[str]:
    """Fill unset hyper-parameters from the checkpoint's meta, as chat_sft does; says what it chose."""
    user_config = meta.get("user_config") or {}
    chosen = []
    for name, fallback, where in INHERITED:
        source = meta if where == "meta" else user_config
        stored = source.get(META_NAMES.get(name, name))
        if getattr(args, name) is None:
            value = stored if isinstance(stored, (int, float)) and stored > 0 else fallback
            setattr(args, name, value)
            chosen.append(f"{name}={value}" + (" (checkpoint)" if value == stored else " (default)"))
    return chosen


def _plan(args: argparse.Namespace, world: World) -> Plan:
    T, rows = _positive("max_seq_len", args.max_seq_len), _positive("device_batch_size", args.device_batch_size)
    per_micro = rows * T
    if args.batch_tokens % (per_micro * world.size):
        raise NanochatError(
            f"--batch-tokens {args.batch_tokens} must be a multiple of --device-batch-size x --max-seq-len x "
            f"processes = {rows} x {T} x {world.size} = {per_micro * world.size}"
        )
    if args.steps == 0 or args.steps < -1 or args.epochs <= 0:
        raise NanochatError("--steps must be >= 1 (or -1 for --epochs), --epochs > 0")
    return Plan(args, T + 1, args.batch_tokens // T, args.batch_tokens // per_micro)


class FullTrainer:
    """MuonAdamW on every weight (the training core)."""

    def __init__(self, model: Any, args: argparse.Namespace) -> None:
        from . import reference_optimizer

        self.model = model
        self.optimizer = reference_optimizer(
            model, args.unembedding_lr, args.embedding_lr, args.matrix_lr, 0.0, init_lr_frac=args.init_lr_frac
        )

    def loss_and_grads(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, np.ndarray | RowGrad]]:
        from . import loss_and_row_grads

        return loss_and_row_grads(self.model, inputs, targets)

    def apply(self, grads: dict[str, np.ndarray | RowGrad], lr_multiplier: float, momentum: float) -> None:
        from . import apply_gradients

        apply_gradients(self.model, self.optimizer, grads, lr_multiplier, momentum, consume=True)

    def save_state(self, path: Path) -> None:
        from .optimizer_state import save_optimizer_state

        save_optimizer_state(path, self.model, self.optimizer)

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        from .optimizer_state import load_optimizer_state

        load_optimizer_state(self.model, self.optimizer, state)


def _check_method(args: argparse.Namespace, backend: str, quantized: bool) -> None:
    """Refuse what the chosen method cannot do (before the load when the options tell, else after)."""
    if args.lora_rank <= 0 and quantized:
        raise NanochatError("full fine-tuning needs unquantized weights: drop --quantize, or use --lora-rank")
    if args.lora_rank > 0 and backend == "torch" and quantized:
        raise NanochatError("torch LoRA needs unquantized weights: drop --quantize (QLoRA runs on --backend mlx)")


def _trainer(loaded: LoadedModel, args: argparse.Namespace):
    _check_method(args, loaded.backend, bool(loaded.quantization))
    if args.lora_rank <= 0:
        return FullTrainer(loaded.model, args)
    lora = _lora(loaded)
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    lora.apply_lora(loaded.model, args.lora_rank, _lora_alpha(args), args.lora_layers, targets, args.seed)
    return lora.LoRATrainer(loaded.model, args.lr, weight_decay=0.0)


def _lora(loaded: LoadedModel) -> ModuleType:
    """The LoRA module of the model's backend (the adapters and their file are the same in both)."""
    if loaded.backend == "torch":
        from . import torch_lora

        return torch_lora
    from . import lora

    return lora


def _lora_alpha(args: argparse.Namespace) -> float:
    return args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank


class Progress:
    """One status line on stderr: redrawn in place on a terminal, every tenth step otherwise."""

    def __init__(self, world: World, total: int | None) -> None:
        self.enabled, self.total, self.tty = world.main, total, sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, loss: float, tok_per_s: float, progress: float, peak: int, last: bool) -> None:
        if not self.enabled or not (self.tty or last or step % 10 == 0 or step == 1):
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed * (1 - progress) / progress if progress > 0 else float("nan")
        width = 20
        filled = min(width, int(width * progress))
        total = f"/{self.total}" if self.total else ""
        line = (
            f"step {step}{total} [{'#' * filled}{'.' * (width - filled)}] {100 * progress:3.0f}% | "
            f"loss {loss:.4f} | {tok_per_s:,.0f} tok/s | ETA {_duration(eta)} | peak {peak / 2**20:,.0f} MiB"
        )
        if self.tty:
            print(f"\r\033[K{line}", end="\n" if last else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(("\r\033[K" if self.tty else "") + text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _state_path(directory: Path, step: int) -> Path:
    return directory / f"train_state_{step:06d}.json"


def _latest_state(directory: Path) -> Path:
    states = sorted(directory.glob("train_state_*.json"))
    if not states:
        raise NanochatError(f"{directory}: nothing to resume (no train_state_*.json)")
    return states[-1]


def _save(directory: Path, step: int, loaded: LoadedModel, trainer, plan: Plan, packer: Packer, run: dict) -> None:
    """A checkpoint the reference can load (full) or the adapters (LoRA), then our resume state."""
    from . import save_checkpoint

    args = plan.args
    config = {k: v for k, v in vars(args).items() if k not in ("resume",)}
    if plan.lora:
        from .lora_spec import save_adapters

        directory.mkdir(parents=True, exist_ok=True)
        save_adapters(directory, _lora(loaded).adapter_arrays(loaded.model), {"step": step, **config})
    else:
        save_checkpoint(directory, step, loaded.model, loaded.tokenizer, run.get("val_bpb"), config)
        meta = directory / f"meta_{step:06d}.json"
        # The run's batch geometry at the top level, where chat_sft (and a next sft) inherits it from.
        batch = {"max_seq_len": args.max_seq_len, "device_batch_size": args.device_batch_size,
                 "total_batch_size": args.batch_tokens}  # fmt: skip
        written = json.loads(meta.read_text())
        meta.write_text(json.dumps({**written, **batch, "val_loss": run.get("val_loss")}, indent=2) + "\n")
    trainer.save_state(directory / f"optimizer_{step:06d}.npz")
    state = {"step": step, "args": config, "data": packer.state(), "run": run}
    _state_path(directory, step).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def _fuse(directory: Path, step: int, loaded: LoadedModel, args: argparse.Namespace, run: dict) -> None:
    from . import save_checkpoint
    from .lora_spec import fuse

    base = load_model(LoadOptions(args.source, args.step, args.arch, "float32", None, loaded.backend))
    fuse(base.model, _lora(loaded).adapter_arrays(loaded.model), _lora_alpha(args) / args.lora_rank)
    save_checkpoint(directory, step, base.model, base.tokenizer, run.get("val_bpb"), vars(args))


def _plot(directory: Path) -> str:
    """loss.png from train_log.jsonl; a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "note: no loss.png (install matplotlib: pip install 'nanochat-mlx[train]')"
    lines = [json.loads(line) for line in (directory / LOG).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"nanochat-mlx sft: {directory.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / PLOT)
    plt.close(fig)
    return f"wrote {directory / PLOT}"


def _resume_args(args: argparse.Namespace, given: list[str]) -> tuple[argparse.Namespace, dict]:
    """The first run's options (the horizon and the output as given now) and its saved state."""
    directory = Path(args.resume)
    path = _latest_state(directory)
    state = read_json(path, "training state")
    if not isinstance(state, dict) or not isinstance(state.get("args"), dict) or not isinstance(state.get("step"), int):
        raise NanochatError(f"{path}: not a training state written by nanochat-mlx sft (no step and args)")
    saved = argparse.Namespace(**state["args"])
    for name in RESUMABLE:
        if any(g == f"--{name.replace('_', '-')}" or g.startswith(f"--{name.replace('_', '-')}=") for g in given):
            setattr(saved, name, getattr(args, name))
    saved.out, saved.resume = str(directory), str(directory)
    return saved, state


def main(argv: list[str]) -> int:
    from ..cli import load_options, names_a_model

    args = build_parser().parse_args(argv)
    state = None
    if args.resume:
        args, state = _resume_args(args, argv)
    elif not args.data or not args.out:
        raise NanochatError("give --data FILE.jsonl and --out DIR (or --resume DIR)")
    world = init_world()
    progress = Progress(world, args.steps if args.steps > 0 else None)
    out = Path(args.out)
    if state is None and out.exists() and any(out.glob("train_state_*.json")):
        raise NanochatError(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")
    if state is not None and not args.lora_rank:  # the full run's own latest checkpoint
        options = LoadOptions(args.out, state["step"], args.arch, args.dtype, args.quantize, args.backend)
    elif not names_a_model(args):
        raise NanochatError("give --source (the checkpoint to fine-tune: a folder, hf:owner/name or nanochat:phase)")
    else:  # spelt as the chat command takes it: -i sft, -g d20 and the rest
        options = load_options(args)
    _check_method(args, options.backend, options.quantize is not None)
    loaded = load_model(options)
    inherited = _inherit(args, loaded.checkpoint.meta)
    plan = _plan(args, world)
    tokenizer, bos = loaded.tokenizer, loaded.tokenizer.get_bos_token_id()
    train = read_dataset(args.data, tokenizer, plan.row_capacity, args.strict)
    val = read_dataset(args.val, tokenizer, plan.row_capacity, args.strict) if args.val else None
    for dataset in (train, val):
        _report_skipped(dataset, progress)
    trainer = _trainer(loaded, args)
    packer = Packer(train, plan.row_capacity, bos, args.seed)
    run: dict[str, Any] = {"smooth_loss": 0.0, "val_loss": None, "val_bpb": None}
    step = 0
    if state is not None:
        step, run = state["step"], state["run"]
        packer.restore(state["data"])
        if args.lora_rank:
            _lora(loaded).load_adapters(out, loaded.model)
        with np.load(out / f"optimizer_{step:06d}.npz") as saved:
            trainer.restore(saved)
    progress.note(
        f"{loaded.description}\n{len(train.examples):,} examples ({train.n_tokens:,} tokens) from {train.path}; "
        f"{plan.rows_per_step} rows x {args.max_seq_len} tokens a step, {plan.micro_batches} micro-batches of "
        f"{args.device_batch_size} over {world.size} process(es)" + ("; LoRA" if plan.lora else "")
    )
    inherited = [x for x in inherited if not (plan.lora and x.split("=")[0].endswith("_lr"))]  # LoRA: --lr
    if inherited:
        progress.note("inherited: " + ", ".join(inherited))
    if train.n_tokens < args.batch_tokens:
        progress.note(_small_data_note(train.n_tokens, args))
    finished = _train(plan, loaded, trainer, packer, val, world, progress, step, run, out)
    return 0 if finished else 130  # 130: interrupted, as a shell reports Ctrl-C


def _small_data_note(n_tokens: int, args: argparse.Namespace) -> str:
    """Rows are packed epoch after epoch (as chat_sft does), so data smaller than a step repeats within it."""
    return (
        f"note: the data holds {n_tokens:,} tokens, under one step's {args.batch_tokens:,}: every step repeats "
        f"it about {args.batch_tokens / n_tokens:.0f} times; smaller steps need a smaller --batch-tokens (a "
        "multiple of --device-batch-size x --max-seq-len)"
    )


class StopAtStepEnd:
    """Ctrl-C during training: the first one ends the run after the step under way, which is then
    saved, so ``--resume`` continues exactly where it stopped; a second one stops at once.

    Only in a one-process run: the processes of a data-parallel run would each see the signal at a
    step of their own and wait for one another forever, so they stop at once, as before.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopAtStepEnd:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, sig: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # the second Ctrl-C: at once
        print("\nstopping after this step, which will be saved (Ctrl-C again: at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


def _report_skipped(dataset: Dataset | None, progress: Progress) -> None:
    if dataset is not None and dataset.skipped:
        progress.note(f"note: skipped {len(dataset.skipped)} bad line(s); the first: {dataset.skipped[0]}")


def _gradients(plan: Plan, world: World, trainer, rows: list) -> tuple[float, dict[str, np.ndarray | RowGrad]]:
    """One step's mean loss and gradients: this process's micro-batches, summed over the processes."""
    total_loss, total = 0.0, {}
    rows_micro = plan.args.device_batch_size
    for m in range(world.rank, plan.micro_batches, world.size):
        x, y = batch_arrays(rows[m * rows_micro : (m + 1) * rows_micro])
        loss, grads = trainer.loss_and_grads(x, y)
        total_loss += loss
        # Summed in place in float32 (the processes' sum is a float32 message anyway): a d20
        # model's dense gradients are 2 GB, and every extra copy of them is memory the run lacks.
        for name, g in grads.items():
            if name in total:
                total[name] += g
            else:
                total[name] = g if isinstance(g, RowGrad) else g.astype(np.float32, copy=False)
        del grads, g  # before the next micro-batch's backward
    total["__loss__"] = np.array([total_loss])
    grads = sum_arrays(world, total)
    loss = float(grads.pop("__loss__")[0]) / plan.micro_batches
    for g in grads.values():
        values = g.values if isinstance(g, RowGrad) else g
        values /= plan.micro_batches
    return loss, grads


def _train(plan: Plan, loaded, trainer, packer, val, world: World, progress: Progress, step: int, run, out) -> bool:
    """Train until done (True), or until Ctrl-C ends it after a saved step (False)."""
    from .checkpoints import token_bytes

    args = plan.args
    schedule = LRSchedule(args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    bytes_per_token = token_bytes(loaded.tokenizer)
    rows_micro = args.device_batch_size
    log = None
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        log = (out / LOG).open("a", encoding="utf-8")

    def write(record: dict) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def validate() -> None:
        if val is None:
            return
        loss, bpb = evaluate(
            loaded.model, eval_rows(val, plan.row_capacity, packer.bos), rows_micro, bytes_per_token, world
        )
        run["val_loss"], run["val_bpb"] = loss, bpb
        write({"step": step, "val_loss": loss, "val_bpb": bpb})
        progress.note(f"step {step}: validation loss {loss:.4f}, {bpb:.4f} bits per byte")

    def done() -> bool:
        return step >= args.steps if args.steps > 0 else packer.epochs_done >= args.epochs

    if step == 0 and args.eval_every > 0:
        validate()
    saved = step  # the last step whose checkpoint is on disk (or the one resumed from)
    with StopAtStepEnd(world.size == 1) as interrupt:
        while not done() and not interrupt.requested:
            t0 = time.perf_counter()
            rows = packer.rows(plan.rows_per_step)
            loss, grads = _gradients(plan, world, trainer, rows)
            fraction = step / args.steps if args.steps > 0 else min(packer.epochs_done / args.epochs, 1.0)
            lrm = schedule(fraction)
            if plan.lora:
                trainer.apply(grads, lrm)
            else:
                trainer.apply(grads, lrm, muon_momentum(step))
            del grads  # (applied, and emptied by a full trainer) before the next step's backward
            step += 1
            dt = time.perf_counter() - t0
            tok_per_s = args.batch_tokens / dt
            run["smooth_loss"] = 0.9 * run["smooth_loss"] + 0.1 * loss
            smooth = run["smooth_loss"] / (1 - 0.9**step)  # the EMA, debiased
            tokens = step * args.batch_tokens
            write({"step": step, "loss": loss, "lr_multiplier": lrm, "tokens": tokens, "tok_per_s": tok_per_s})
            shown = step / args.steps if args.steps > 0 else min(packer.epochs_done / args.epochs, 1.0)
            progress.update(step, smooth, tok_per_s, shown, loaded.engine.peak_memory(), done())
            if done() or (args.eval_every > 0 and step % args.eval_every == 0):
                validate()
            stopping = done() or interrupt.requested
            if world.main and (stopping or (args.save_every > 0 and step % args.save_every == 0)) and step > saved:
                _save(out, step, loaded, trainer, plan, packer, run)
                saved = step
    if log is not None:
        log.close()
    if world.main:
        if plan.lora and args.fuse and done():
            _fuse(out, step, loaded, args, run)
        if step == 0:
            progress.note("stopped before the first step: nothing was saved")
            return False
        progress.note(_plot(out))
        if done():
            progress.note(f"done: step {step}, checkpoints in {out}")
        else:
            progress.note(f"stopped at step {step} (saved); continue with: nanochat-mlx sft --resume {out}")
    return done()
