"""Decode speed of the torch backend (through our Engine) vs the reference's own code, interleaved.

    python benchmarks/vs_reference.py --geometry d20 --arch g9 --dtype bfloat16 --quantize none,4

The reference is nanochat's own ``nanochat.gpt.GPT`` + ``nanochat.engine.Engine`` of the
generation's first commit, extracted from the mirror (g9: 92d63d4, g1: 3a5e0bc), fed the same
random weights (``nanochat_mlx.synthetic``), greedy at batch 1. Every contender's decode rate is
taken by one outside clock from its first token to the end of its generator, counting the decode
steps run in between: the reference runs one forward after each token it yields, the last one
included (k tokens: k steps); our Engine on the CPU runs a step before each token but the first
(k - 1), pipelined (CUDA/MPS) it has run the next step before yielding a token and the last needs
none (k - 2; see engine_clock.py). Our Engine's own reported ``decode_tps`` is printed beside
it (their ratio should be 1). One dtype per process: the reference reads its
compute dtype (``NANOCHAT_DTYPE``) at import. The reference's bfloat16 model is cast to bfloat16
once (its CPU Linear would otherwise cast the float32 weights on every call).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from decode_kernels import read_bandwidth

MIRROR = Path("/work/.mirror/karpathy+nanochat/repo")
COMMITS = {"g1": "3a5e0bc", "g9": "92d63d4"}


def reference_tree(arch: str) -> Path:
    """An extracted tree of the reference at the generation's commit (cached in /tmp)."""
    tree = Path(f"/tmp/ref-{arch}")
    if not (tree / "nanochat" / "gpt.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(MIRROR), "archive", COMMITS[arch]], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def cpu_model() -> str:
    """The CPU's model name (Linux), for the result file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return names[0] if names else "unknown"


def reference_engine(ckpt, arch: str, dtype: str):
    """The reference's own ``Engine`` over its own ``GPT`` holding ``ckpt``'s weights in ``dtype``.

    Call once per process: the reference reads its compute dtype (``NANOCHAT_DTYPE``) at import.
    """
    os.environ["NANOCHAT_DTYPE"] = dtype
    sys.path.insert(0, str(reference_tree(arch)))
    from nanochat.engine import Engine as RefEngine
    from nanochat.gpt import GPT, GPTConfig

    c = ckpt.config
    fields = dict(
        sequence_len=c.sequence_len,
        vocab_size=c.vocab_size,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_kv_head=c.n_kv_head,
        n_embd=c.n_embd,
    )
    if arch != "g1":
        fields["window_pattern"] = c.window_pattern
    with torch.device("meta"):
        ref = GPT(GPTConfig(**fields))
    ref.to_empty(device="cpu")
    ref.init_weights()  # the rotary tables; the weights come next, sharing the numpy arrays' memory
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.weights.items()}, strict=True, assign=True)
    ref.eval()
    if dtype == "bfloat16":
        ref.to(torch.bfloat16)
    return RefEngine(ref, ckpt.tokenizer)


def steps_per_second(tokens, trailing: int) -> float:
    """Decode steps per second from the first of ``tokens`` to their end, ``k - 1 + trailing`` steps for k tokens."""
    first, k = None, 0
    for _ in tokens:
        first, k = first or time.perf_counter(), k + 1
    return (k - 1 + trailing) / (time.perf_counter() - first)


def bytes_per_token(model, context: int) -> int:
    """What one decode step must read: every weight but the embedding tables (one row each), and
    the keys and values each layer attends to at ``context``."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embeddings)
    c = model.config
    per_position = 2 * c.n_kv_head * c.head_dim * torch.empty((), dtype=model.dtype).element_size()
    kv = sum(per_position * (context if w is None else min(context, w + 1)) for w in model.window_sizes)
    return weights + kv


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="d12")
    p.add_argument("--arch", default="g9", choices=sorted(COMMITS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", default="none", help="comma-separated: none, 8, 4 (ours; bfloat16 only)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt of the prefill timing (0: none)")
    p.add_argument("--json", type=Path, help="append the result as one JSON line here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from nanochat_mlx.backends.torch.model import build_torch_model
    from nanochat_mlx.engine import Engine
    from nanochat_mlx.sampling import SamplingParams
    from nanochat_mlx.synthetic import random_checkpoint

    ckpt = random_checkpoint(args.geometry, arch=args.arch, seed=0)
    ref_engine = reference_engine(ckpt, args.arch, args.dtype)

    ours, roofline = {}, {}
    load_before = os.getloadavg()[0]
    bandwidth = read_bandwidth()
    context = args.prompt_tokens + args.decode_tokens // 2
    for q in args.quantize.split(","):
        bits = None if q == "none" else int(q)
        model = build_torch_model(ckpt, dtype=args.dtype, quantize=bits)
        name = f"ours{f'-q{bits}' if bits else ''}"
        ours[name] = Engine(model, ckpt.tokenizer)
        roofline[name] = bandwidth / bytes_per_token(model, context)

    prompt = [ckpt.tokenizer.get_bos_token_id(), *range(300, 300 + args.prompt_tokens - 1)]
    n = args.decode_tokens

    params = SamplingParams(temperature=0.0, max_tokens=n)
    long_prompt = [ckpt.tokenizer.get_bos_token_id(), *range(300, 300 + args.prefill_tokens - 1)]
    first_token = SamplingParams(temperature=0.0, max_tokens=1)
    rates: dict[str, list[float]] = {name: [] for name in [*ours, "reference"]}
    prefill: dict[str, list[float]] = {name: [] for name in rates}
    reported: dict[str, list[float]] = {name: [] for name in ours}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, engine in ours.items():
                events = (e for e in engine.generate(prompt, params, stop_tokens=()) if e.tokens)
                rates[name].append(steps_per_second(events, -1 if engine.runner.pipelined else 0))
                reported[name].append(engine.last_stats.decode_tps)
                if args.prefill_tokens:
                    t = time.perf_counter()
                    next(e for e in engine.generate(long_prompt, first_token, stop_tokens=()) if e.tokens)
                    prefill[name].append(args.prefill_tokens / (time.perf_counter() - t))
            gen = ref_engine.generate(prompt, num_samples=1, max_tokens=n, temperature=0.0)
            rates["reference"].append(steps_per_second(gen, 1))
            if args.prefill_tokens:
                t = time.perf_counter()
                next(ref_engine.generate(long_prompt, num_samples=1, max_tokens=1, temperature=0.0))
                prefill["reference"].append(args.prefill_tokens / (time.perf_counter() - t))

    med = {name: statistics.median(v) for name, v in rates.items()}
    prefill_med = {name: statistics.median(v) for name, v in prefill.items() if v}
    result = {
        "geometry": args.geometry,
        "arch": args.arch,
        "dtype": args.dtype,
        "threads": args.threads,
        "prompt": args.prompt_tokens,
        "decode": args.decode_tokens,
        "rounds": args.rounds,
        "decode_tps": med,
        "all": rates,
        "ratio_vs_reference": {name: med[name] / med["reference"] for name in ours},
        "prefill_tokens": args.prefill_tokens,
        "prefill_tps": prefill_med,
        "prefill_ratio_vs_reference": {name: prefill_med[name] / prefill_med["reference"] for name in ours}
        if prefill_med
        else {},
        "read_bandwidth_gbs": bandwidth / 1e9,
        "load_average": [load_before, os.getloadavg()[0]],  # 1-minute load before and after the run
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "roofline_tps": roofline,
        "fraction_of_roofline": {name: med[name] / roofline[name] for name in ours},
        "engine_reported_over_outside_clock": {
            name: statistics.median(r / o for r, o in zip(reported[name], rates[name], strict=True)) for name in ours
        },
    }
    print(json.dumps(result))
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
