"""Measurement: load the contenders, run interleaved trials, turn them into rows.

Every run is timed by the outside clock (when tokens reach the caller), the same for every
contender. Per trial and prompt length each contender runs twice: one token (prefill + first
sample = ``T1``) and ``n`` tokens (the n-th arrives at ``Tn``), so decode speed is
``(n - 1) / (Tn - T1)``: n - 1 decode steps, whatever an engine overlaps or where its own clock
starts. Our engine's own figure is reported next to it.
"""

from __future__ import annotations

import math
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..errors import NanochatError
from ..loading import from_checkpoint
from ..options import LoadOptions
from . import contenders as cs
from .report import Row

QUALITY_TEXT = (
    "The sky is blue because molecules in the air scatter short wavelengths of sunlight more than long ones. "
    "User: what is 12 * 7? Assistant: 12 * 7 = 84. Photosynthesis converts light, water and carbon dioxide "
    "into sugar and oxygen; the Krebs cycle then releases energy stored in those sugars. "
)


@dataclass
class Trial:
    ttft_s: float  # call -> first token, in a run of n tokens
    prefill_tps: float  # prompt tokens / T1
    decode_tps: float  # (n - 1) / (Tn - T1)
    own_decode_tps: float | None  # the implementation's own clock (our Engine's stats)
    peak_memory_bytes: int | None
    tokens: list[int]


def measure(c: cs.Contender, prompt: list[int], n: int) -> Trial:
    """One trial: a one-token run, then an n-token run."""
    one = c.generate(prompt, 1)
    full = c.generate(prompt, n)
    # Tn - T1 is n - 1 decode steps for any engine. Only where noise swamps a tiny model's decode
    # (Tn <= T1) fall back to the n-token run's own first-to-last span.
    t1 = one.first_s if full.last_s > one.first_s else full.first_s
    decode = (n - 1) / (full.last_s - t1) if n > 1 else 0.0
    peaks = [t.peak_memory_bytes for t in (one, full) if t.peak_memory_bytes]
    return Trial(full.first_s, len(prompt) / one.first_s, decode, full.own_decode_tps, max(peaks, default=None),
                 full.tokens)  # fmt: skip


def memory_bandwidth_gbps(threads: int, size_mb: int = 512, repeats: int = 7) -> float:
    """Best read bandwidth (GB/s) seen with ``threads`` threads each summing its slice of a float32 array."""
    a = np.ones(size_mb * 2**20 // 4, np.float32)
    chunks = np.array_split(a, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL inside the sums
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def decoder_threads(backends: tuple[str, ...], compare: tuple[str, ...]) -> int:
    """Threads the decoders run on: torch's intra-op count when torch decodes, else every core."""
    if "torch" in backends or "reference" in compare:
        import torch

        return torch.get_num_threads()
    return os.cpu_count() or 1


def write_native_checkpoint(ckpt: Checkpoint, folder: Path, step: int = 0) -> Path:
    """Write ``ckpt`` as the reference saves it: model_<step>.pt, meta_<step>.json, tokenizer/tokenizer.pkl."""
    import json

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    state = {name: torch.from_numpy(np.asarray(w, dtype=np.float32)) for name, w in ckpt.weights.items()}
    torch.save(state, folder / f"model_{step:06d}.pt")
    config = {k: v for k, v in ckpt.config.to_dict().items() if k != "padded_vocab_size"}
    if not ckpt.spec.windowed:  # GPTConfig had no window_pattern before g4
        del config["window_pattern"]
    meta = {"step": step, "model_config": config}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    (folder / "tokenizer").mkdir(exist_ok=True)
    with open(folder / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(ckpt.tokenizer.enc, f)
    return folder


def native_folder(ckpt: Checkpoint) -> tuple[Path, int] | None:
    """The folder and step the reference can load ``ckpt`` from as it is, if any."""
    files = ckpt.files
    if files.layout != "native" or files.step is None:
        return None
    folder = files.weights[0].parent
    if files.tokenizer != folder / "tokenizer" / "tokenizer.pkl":  # its get_tokenizer reads only there
        return None
    return folder, files.step


def quality(ckpt: Checkpoint, dtype: str, bits: int, backend: str = "mlx") -> dict[str, float]:
    """Teacher-forced logits of the quantized vs the unquantized model on English-like text."""
    ids = [ckpt.tokenizer.get_bos_token_id(), *ckpt.tokenizer.encode(QUALITY_TEXT * 2)][:256]

    def logits(quantize: int | None) -> np.ndarray:
        model = from_checkpoint(ckpt, LoadOptions(ckpt.name, dtype=dtype, quantize=quantize, backend=backend)).model
        if backend == "torch":
            import torch

            with torch.inference_mode():
                return model(torch.tensor([ids], device=model.device))[0].cpu().numpy()
        import mlx.core as mx

        return np.array(model(mx.array([ids]))[0])

    ref, q = logits(None), logits(bits)
    return {
        "mean_abs_dlogit": float(np.abs(ref - q).mean()),
        "max_abs_dlogit": float(np.abs(ref - q).max()),
        "mean_abs_logit": float(np.abs(ref).mean()),
        "greedy_agreement": float((ref.argmax(-1) == q.argmax(-1)).mean()),
        "positions": len(ids),
    }


def _prompt(ckpt: Checkpoint, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    top = ckpt.config.vocab_size - 9  # ordinary tokens only
    return [ckpt.tokenizer.get_bos_token_id(), *rng.integers(0, top, size=n - 1).tolist()]


def _matching_prefix(a: list[int], b: list[int]) -> float:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return same / len(a)


def _rows(
    c: cs.Contender, ckpt: Checkpoint, geometry: str, decode_tokens: int, bandwidth: float, threads: int
) -> list[Row]:
    rows = []
    itemsize = cs.ITEMSIZE[c.dtype]
    for n, trials in sorted(c.trials.items()):
        context = n + decode_tokens // 2
        roofline = weights = None
        if c.quantize is None:  # the byte accounting covers unquantized weights only
            weights = ckpt.config.weight_bytes(ckpt.spec, itemsize)
            per_token = ckpt.config.decode_weight_bytes(ckpt.spec, itemsize)
            per_token += ckpt.config.kv_read_bytes(ckpt.spec, context, itemsize)
            roofline = bandwidth * 1e9 / per_token
        pre = [t.prefill_tps for t in trials]
        dec = [t.decode_tps for t in trials]
        own = [t.own_decode_tps for t in trials if t.own_decode_tps is not None]
        peaks = [t.peak_memory_bytes for t in trials if t.peak_memory_bytes is not None]
        rows.append(
            Row(
                impl=c.impl,
                backend=c.backend,
                device=c.device,
                dtype=c.dtype,
                quantize=c.quantize,
                geometry=geometry,
                arch=ckpt.spec.name,
                prompt_tokens=n,
                decode_tokens=decode_tokens,
                context=context,
                prefill_tps=statistics.median(pre),
                decode_tps=statistics.median(dec),
                own_decode_tps=statistics.median(own) if own else None,
                ttft_s=statistics.median(t.ttft_s for t in trials),
                peak_memory_bytes=max(peaks) if peaks else None,
                weight_bytes=weights,
                bandwidth_gbps=bandwidth,
                threads=threads,
                roofline_decode_tps=roofline,
                trials=len(trials),
                per_trial={
                    "prefill_tps": pre,
                    "decode_tps": dec,
                    "own_decode_tps": [t.own_decode_tps for t in trials],
                    "ttft_s": [t.ttft_s for t in trials],
                },
                load_cold_s=c.load_cold_s,
                load_warm_s=c.load_warm_s,
                tokens=trials[-1].tokens,
            )
        )
    return rows


def run_benchmark(
    ckpt: Checkpoint,
    *,
    geometry: str,
    source: str | None = None,
    backends: tuple[str, ...] = ("mlx",),
    dtypes: tuple[str, ...] = ("float32",),
    quantize: tuple[int | None, ...] = (None,),
    compare: tuple[str, ...] = (),
    reference_repo: Path | None = None,
    prompt_lengths: tuple[int, ...] = (128, 1024),
    decode_tokens: int = 32,
    trials: int = 3,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[Row]:
    """Measure every implementation x backend x dtype x quantization; trials interleaved."""
    if "reference" in compare and reference_repo is None:
        raise NanochatError("--compare reference needs --reference-repo DIR (a checkout of karpathy/nanochat)")
    limit = ckpt.config.rope_len - decode_tokens
    prompt_lengths = tuple(n for n in prompt_lengths if n <= limit) or (min(limit, 16),)
    threads = decoder_threads(backends, compare)
    bandwidth = memory_bandwidth_gbps(threads)
    log(f"memory read bandwidth ~{bandwidth:.1f} GB/s (best of numpy sums on {threads} threads)")
    with tempfile.TemporaryDirectory(prefix="nanochat-bench-") as tmp:
        native = None
        if "reference" in compare:
            native = native_folder(ckpt)
            if native is None:  # both sides load the same native folder: write one
                log(f"writing a native checkpoint for the reference to {tmp}")
                native = (write_native_checkpoint(ckpt, Path(tmp)), 0)
            source = str(native[0])
        contenders = _load(ckpt, source, backends, dtypes, quantize, compare, reference_repo, native, threads, log)
        try:
            _trials(ckpt, contenders, prompt_lengths, decode_tokens, trials, log)
        finally:
            for c in contenders:
                c.close()
    rows = [r for c in contenders for r in _rows(c, ckpt, geometry, decode_tokens, bandwidth, threads)]
    for r in rows:
        ref = next((o for o in rows if o.impl == "reference" and (o.dtype, o.prompt_tokens) == (r.dtype,
                    r.prompt_tokens)), None)  # fmt: skip
        if ref is not None and r is not ref:
            r.greedy_match = _matching_prefix(r.tokens, ref.tokens)
    for backend, dtype, bits in sorted({(r.backend, r.dtype, r.quantize) for r in rows if r.quantize}):
        q = quality(ckpt, dtype, bits, backend)
        log(
            f"quality q{bits} {backend} {dtype}: mean |dlogit| {q['mean_abs_dlogit']:.4f} (mean |logit| "
            f"{q['mean_abs_logit']:.3f}), greedy agreement {q['greedy_agreement'] * 100:.1f}%"
        )
        for r in rows:
            if (r.backend, r.dtype, r.quantize) == (backend, dtype, bits):
                r.quality = q
    return rows


def _load(ckpt, source, backends, dtypes, quantize, compare, reference_repo, native, threads, log):
    mlx_lm_ok = not (ckpt.spec.lambdas or ckpt.spec.value_embeds or ckpt.spec.smear)
    if "mlx-lm" in compare and not mlx_lm_ok:
        log(f"note: mlx-lm's nanochat model computes g1 math only; skipping it for {ckpt.spec.name} (use --arch g1)")
    contenders: list[cs.Contender] = []
    try:
        for dtype in dtypes:
            for bits in quantize:
                for backend in backends:
                    if bits and backend == "torch" and (bits == 4 or dtype == "float32"):
                        continue  # the torch backend quantizes to 8 bits, with 16-bit activations
                    log(f"loading nanochat-mlx ({backend}, {dtype}{f', q{bits}' if bits else ''})")
                    contenders.append(cs.ours(ckpt, backend, dtype, bits, source))
                if "mlx-lm" in compare and mlx_lm_ok:
                    log(f"loading mlx-lm ({dtype}{f', q{bits}' if bits else ''})")
                    contenders.append(cs.mlx_lm(ckpt, dtype, bits))
            if "reference" in compare:
                log(f"loading the reference from {reference_repo} (torch, {dtype}, {threads} threads)")
                contenders.append(cs.reference(reference_repo, native[0], native[1], dtype, threads))
    except BaseException:
        for c in contenders:
            c.close()
        raise
    return contenders


def _trials(ckpt, contenders, prompt_lengths, decode_tokens, trials, log) -> None:
    if any(c.quantize for c in contenders if c.backend == "mlx"):
        import mlx.core as mx

        if mx.default_device() != mx.gpu:
            log("note: MLX's quantized matmul kernels are slow on the CPU; quantization pays off on Metal")
    prompts = {n: _prompt(ckpt, n, seed=n) for n in prompt_lengths}
    for c in contenders:  # warm-up: compile kernels, touch the weights
        c.generate(_prompt(ckpt, 8, seed=1), 2)
    for trial in range(trials):
        for n in prompt_lengths:
            for c in contenders:
                t = measure(c, prompts[n], decode_tokens)
                c.trials.setdefault(n, []).append(t)
                own = f" (own clock {t.own_decode_tps:6.2f})" if t.own_decode_tps else ""
                log(
                    f"trial {trial + 1}/{trials} {c.impl:12s} {c.backend:5s} {c.dtype:8s} q={c.quantize} "
                    f"prompt {n:5d}: prefill {t.prefill_tps:8.1f} tok/s, decode {t.decode_tps:6.2f} tok/s{own}"
                )


def chat_turn_ttft(
    ckpt: Checkpoint, backend: str, dtype: str, turns: int = 5, reply_tokens: int = 32, message_words: int = 60
) -> dict:
    """Time to first token of the last of ``turns`` chat turns, with and without the prompt cache.

    The warm session keeps its KV cache across turns (only the new message is prefilled); the
    cold one is handed the same history and prefills all of it, as the reference's chat does.
    """
    from ..sampling import SamplingParams
    from ..session import ChatSession, Turn

    loaded = from_checkpoint(ckpt, LoadOptions(ckpt.name, dtype=dtype, backend=backend))
    engine = loaded.engine
    params = SamplingParams(temperature=0.0, top_k=None, max_tokens=reply_tokens)
    words = "the model reads every token of the conversation again unless its cache is kept".split()
    messages = [" ".join(words[(i + j) % len(words)] for j in range(message_words)) for i in range(turns)]
    warm = ChatSession(engine, params=params)
    for message in messages:
        for _ in warm.stream(message):
            pass
    cold = ChatSession(engine, params=params)
    cold.load_turns([Turn(t.user, [dict(p) for p in t.parts], list(t.reply_tokens)) for t in warm.turns[:-1]])
    for _ in cold.stream(messages[-1]):
        pass
    w, c = warm.last_stats, cold.last_stats
    return {
        "backend": loaded.backend,
        "dtype": dtype,
        "turn": turns,
        "prompt_tokens": w.prompt_tokens,
        "prefilled_with_cache": w.prefill_tokens,
        "ttft_with_cache_s": w.ttft_s,
        "ttft_without_cache_s": c.ttft_s,
    }
