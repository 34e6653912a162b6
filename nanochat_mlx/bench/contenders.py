"""The implementations a benchmark measures, each behind one ``generate(prompt, n) -> Timing`` call.

* ``ours``: our model driven by our ``Engine`` (the product path), MLX or torch backend;
* ``mlx_lm``: ``mlx_lm.models.nanochat.Model`` driven by ``mlx_lm.generate.generate_step`` (g1 math);
* ``reference``: the reference's own code (its ``GPT``, ``KVCache`` and ``Engine``, loaded by its
  ``checkpoint_manager.build_model``) from a checkout the user points to, in a worker process
  (``reference_worker.py``) that imports nothing of ours.

Every contender is timed by the same outside clock: when each token reaches the caller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import NanochatError

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Timing:
    """One greedy run of ``n`` tokens, seconds from the call: when the first and the last token arrived."""

    first_s: float
    last_s: float
    tokens: list[int]
    own_ttft_s: float | None = None  # what the implementation's own clock reports, where it has one
    own_decode_tps: float | None = None
    peak_memory_bytes: int | None = None


@dataclass
class Contender:
    """One implementation loaded with one dtype/quantization, ready to generate."""

    impl: str
    backend: str
    device: str
    dtype: str
    quantize: int | None
    generate: Callable[[list[int], int], Timing]
    load_cold_s: float
    load_warm_s: float | None
    close: Callable[[], None] = lambda: None
    trials: dict[int, list[Any]] = field(default_factory=dict)  # prompt length -> run.Trial


def _timed(build: Callable[[], Any]) -> tuple[Any, float, float]:
    """Build twice (first = cold, second = warm); keep the second."""
    t0 = time.perf_counter()
    build()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = build()
    return model, cold, time.perf_counter() - t0


def ours(ckpt: Checkpoint, backend: str, dtype: str, quantize: int | None, source: str | None) -> Contender:
    """nanochat-mlx: load (from ``source`` when given, else from the in-memory checkpoint) + Engine."""
    from ..loading import from_checkpoint, load_model
    from ..options import LoadOptions
    from ..sampling import SamplingParams

    options = LoadOptions(source or ckpt.name, arch=ckpt.spec.name, dtype=dtype, quantize=quantize, backend=backend)

    def build() -> Any:
        return load_model(options) if source is not None else from_checkpoint(ckpt, options)

    loaded, cold, warm = _timed(build)
    model, engine = loaded.model, loaded.engine
    held = _mlx_bytes(model) if backend == "mlx" else 0
    rss = backend == "torch" and loaded.device.startswith("cpu")

    def generate(prompt: list[int], n: int) -> Timing:
        base = _mlx_active_memory() if backend == "mlx" else None
        tokens: list[int] = []
        first = last = 0.0
        stats = None
        t0 = time.perf_counter()
        # Random weights: no stop tokens, so every run decodes exactly n tokens.
        for ev in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n, seed=0), stop_tokens=()):
            if ev.tokens:
                last = time.perf_counter() - t0
                first = first or last
                tokens += ev.tokens
            stats = ev.stats
        assert stats is not None and len(tokens) == n, stats
        peak = stats.peak_memory_bytes or None
        if peak and base is not None:  # other models share the process: count this one's weights only
            peak = peak - base + held
        if rss:  # the process's peak RSS holds every contender loaded in it
            peak = None
        return Timing(first, last, tokens, stats.ttft_s, stats.decode_tps if n > 1 else None, peak)

    return Contender("nanochat-mlx", backend, loaded.device, dtype, quantize, generate, cold, warm)


def _mlx_bytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def _mlx_active_memory() -> int:
    import mlx.core as mx

    return int(mx.get_active_memory())


def mlx_lm_model(ckpt: Checkpoint, dtype: str, quantize: int | None = None) -> Any:
    """mlx-lm's own nanochat model (g1 math) holding ``ckpt``'s weights (vocabulary padding cut off)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.nanochat import Model, ModelArgs

    from ..backends.mlx.model import MLX_DTYPES, QUANT_GROUP, quantizable, to_mlx

    c = ckpt.config
    model = Model(
        ModelArgs(
            hidden_size=c.n_embd,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_kv_head,
            vocab_size=c.vocab_size,
            max_position_embeddings=c.sequence_len,
            intermediate_size=4 * c.n_embd,
            rope_theta=ckpt.spec.rope_base,
        )  # fmt: skip
    )
    weights = []
    for name, a in ckpt.weights.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            a = a[: c.vocab_size]  # mlx-lm has no padded-vocab support
        weights.append((name, to_mlx(a).astype(MLX_DTYPES[dtype])))
    model.load_weights(weights, strict=True)
    if quantize:
        nn.quantize(model, group_size=QUANT_GROUP, bits=quantize, class_predicate=quantizable)
    mx.eval(model.parameters())
    return model


def mlx_lm(ckpt: Checkpoint, dtype: str, quantize: int | None) -> Contender:
    """mlx-lm's own nanochat model (g1 math) with our weights, driven by ``generate_step``."""
    import importlib

    import mlx.core as mx

    generate_step = importlib.import_module("mlx_lm.generate").generate_step

    def build() -> Any:
        return mlx_lm_model(ckpt, dtype, quantize)

    model, cold, warm = _timed(build)
    held = _mlx_bytes(model)

    def generate(prompt: list[int], n: int) -> Timing:
        base = _mlx_active_memory()
        mx.reset_peak_memory()
        tokens: list[int] = []
        first = last = 0.0
        t0 = time.perf_counter()
        sampler = lambda logprobs: mx.argmax(logprobs, axis=-1)
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=sampler):
            tokens.append(int(token))
            last = time.perf_counter() - t0
            first = first or last
        assert len(tokens) == n
        peak = int(mx.get_peak_memory()) - base + held  # this model's weights + what the run allocated
        return Timing(first, last, tokens, peak_memory_bytes=peak)

    device = "gpu (Metal)" if mx.default_device() == mx.gpu else "cpu"
    return Contender("mlx-lm", "mlx", device, dtype, quantize, generate, cold, warm)


WORKER = Path(__file__).with_name("reference_worker.py")


def reference(repo: Path, checkpoint: Path, step: int, dtype: str, threads: int) -> Contender:
    """The reference's own engine on a native checkpoint folder, in a worker process.

    The worker puts ``repo`` first on ``sys.path`` and imports only the reference's inference
    modules; ``NANOCHAT_BASE_DIR`` points its ``get_tokenizer`` at the folder's ``tokenizer/``.
    """
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(checkpoint), NANOCHAT_DTYPE=dtype)
    env.pop("PYTHONPATH", None)  # the worker must not see our package
    log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
    cmd = [sys.executable, str(WORKER), "--repo", str(repo), "--checkpoint", str(checkpoint)]
    cmd += ["--step", str(step), "--dtype", dtype, "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def reply() -> dict:
        line = proc.stdout.readline()
        message = json.loads(line) if line.strip() else {}
        if "error" in message or not message:
            proc.wait()
            log.seek(0)
            tail = " | ".join(log.read().strip().splitlines()[-3:])
            why = message.get("error") or f"exited with status {proc.returncode}"
            if "ModuleNotFoundError" in why:
                why += " (its inference modules need: pip install 'nanochat-mlx[reference]')"
            raise NanochatError(f"reference worker ({repo}): {why}{f' [{tail}]' if tail else ''}")
        return message

    ready = reply()

    def generate(prompt: list[int], n: int) -> Timing:
        proc.stdin.write(json.dumps({"prompt": prompt, "n": n}) + "\n")
        proc.stdin.flush()
        r = reply()
        if len(r["tokens"]) != n:
            raise NanochatError(
                f"the reference stopped after {len(r['tokens'])} of {n} tokens (it sampled <|bos|> or "
                f"<|assistant_end|> on these weights); try another --seed or prompt length"
            )
        return Timing(r["first_s"], r["last_s"], r["tokens"])

    def close() -> None:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=30)
        log.close()

    device = f"cpu (torch {ready['torch']}, {ready['threads']} threads)"
    return Contender("reference", "torch", device, dtype, None, generate, ready["load_cold_s"],
                     ready["load_warm_s"], close)  # fmt: skip
