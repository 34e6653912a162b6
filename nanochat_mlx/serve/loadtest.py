"""Serving benchmark: start a real server, drive it with N concurrent streaming clients, measure.

``run_serve_benchmark`` writes a random-weight checkpoint of a nanochat geometry (``d12``) as a
converted folder, starts ``nanochat-mlx serve`` on it (and, with ``compare=("mlx-lm",)``,
``mlx_lm.server`` on the very same folder), and for each concurrency runs that many clients at
once, each streaming its requests from ``/v1/completions`` one after another. A row per server
and concurrency: aggregate decode throughput (each client's tokens after its first token over the
time after it, summed over the clients), end-to-end output throughput (every generated token over
the level's wall time), time to first token p50/p95, requests, errors.

    python -m nanochat_mlx.serve.loadtest --geometry d12 --arch g1 --backend torch --concurrency 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import NanochatError

MLX_LM = "mlx-lm-server"
OURS = "nanochat-mlx-serve"


@dataclass
class LoadRow:
    impl: str
    backend: str
    geometry: str
    arch: str
    concurrency: int
    requests: int
    errors: int
    max_tokens: int
    generated_tokens: int
    wall_s: float
    aggregate_decode_tps: float  # the clients' decode rates summed (tokens after each one's first)
    output_tps: float  # every generated token over the level's wall time (prefill and queueing included)
    ttft_p50_s: float
    ttft_p95_s: float


# --- clients --------------------------------------------------------------------------------------


def stream_completion(port: int, body: dict, timeout: float = 600) -> tuple[float, int, float]:
    """One streaming /v1/completions request: time to first text, tokens generated, seconds after the first."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", json.dumps(payload), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, chunks, usage = None, 0, None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("text"):
                first = first or time.perf_counter()
                chunks += 1
    end = time.perf_counter()
    conn.close()
    if first is None:
        raise RuntimeError("no text came back")
    return first - start, usage["completion_tokens"] if usage else chunks, end - first


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class LoadResult:
    ttfts: list[float]
    tokens: int  # generated, all requests
    decode_tps: list[float]  # each client's decode rate: tokens after the first over the time after the first
    errors: list[str]
    wall: float


def drive(port: int, concurrency: int, per_client: int, max_tokens: int, prompt: str) -> LoadResult:
    """``concurrency`` clients at once, each streaming ``per_client`` requests in turn."""
    result = LoadResult([], 0, [], [], 0.0)
    lock = threading.Lock()

    def client(i: int) -> None:
        decoded, seconds = 0, 0.0
        for j in range(per_client):
            body = {"prompt": f"{prompt} (client {i}, request {j})", "max_tokens": max_tokens, "temperature": 0}
            try:
                ttft, n, after_first = stream_completion(port, body)
            except (OSError, RuntimeError, ValueError) as e:
                with lock:
                    result.errors.append(str(e))
                continue
            decoded, seconds = decoded + n - 1, seconds + after_first
            with lock:
                result.ttfts.append(ttft)
                result.tokens += n
        if seconds > 0:
            with lock:
                result.decode_tps.append(decoded / seconds)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall = time.perf_counter() - start
    return result


# --- servers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(process: subprocess.Popen, port: int, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NanochatError(f"the server exited with status {process.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise NanochatError(f"the server on port {port} was not ready after {timeout:.0f} s")


@contextmanager
def running(command: list[str], port: int, ready_path: str, threads: int | None = None):
    env = dict(os.environ)
    if threads:  # OpenMP/BLAS threads of the server process (torch's intra-op pool, OpenBLAS)
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_ready(process, port, ready_path)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def server_command(impl: str, folder: Path, port: int, backend: str, rows: int) -> tuple[list[str], str]:
    if impl == OURS:
        command = [sys.executable, "-m", "nanochat_mlx.cli", "serve", "--source", str(folder), "--backend", backend,
                   "--port", str(port), "--max-concurrency", str(rows), "--queue", "1024"]  # fmt: skip
        return command, "/health"
    command = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port), "--log-level",
               "WARNING", "--decode-concurrency", str(rows), "--prompt-concurrency", str(rows)]  # fmt: skip
    return command, "/v1/models"


# --- the checkpoint both servers load -----------------------------------------------------------


def write_checkpoint(folder: Path, geometry: str, arch: str) -> Path:
    """A random-weight ``geometry`` checkpoint as a converted folder, with a Hugging Face
    tokenizer.json beside our tiktoken file so that mlx-lm can load the same folder."""
    from ..convert import convert
    from ..synthetic import random_checkpoint

    ckpt = random_checkpoint(geometry, arch=arch)
    out = convert(ckpt, folder / f"{geometry}-{arch}")
    (out / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(ckpt.tokenizer)), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def hf_tokenizer_json(tokenizer) -> dict:
    """The byte-level BPE of a synthetic tokenizer (single bytes, then byte pairs) in tokenizers' format."""
    from ..tokenizer import _bytes_to_unicode

    table = _bytes_to_unicode()
    ranks = tokenizer.enc._mergeable_ranks
    text = {rank: "".join(table[b] for b in token) for token, rank in ranks.items()}
    merges = [[table[token[0]], table[token[1]]] for token, rank in sorted(ranks.items(), key=lambda x: x[1])
              if len(token) == 2]  # fmt: skip
    specials = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }  # fmt: skip
        for t, i in tokenizer.enc._special_tokens.items()
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: r for r, t in text.items()},
            "merges": merges,
        },  # fmt: skip
    }


# --- the benchmark --------------------------------------------------------------------------------


def run_serve_benchmark(
    geometry: str = "d12",
    arch: str = "g1",
    backend: str = "torch",
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16),
    compare: tuple[str, ...] = (),
    max_tokens: int = 64,
    per_client: int = 2,
    prompt: str = "Tell me a long story about the sea, the wind and the ships that sail between them",
    threads: int | None = None,
    log=print,
) -> list[LoadRow]:
    """Rows of ``nanochat-mlx serve`` (and of ``mlx_lm.server`` if compared) at each concurrency."""
    impls = [(OURS, backend)] + [(MLX_LM, "mlx") for c in compare if c == "mlx-lm"]
    unknown = [c for c in compare if c != "mlx-lm"]
    if unknown:
        raise NanochatError(f"unknown --compare {unknown[0]!r} for the serving benchmark (choose mlx-lm)")
    rows: list[LoadRow] = []
    with tempfile.TemporaryDirectory(prefix="nanochat-serve-bench-") as tmp:
        log(f"writing a random {geometry} {arch} checkpoint")
        folder = write_checkpoint(Path(tmp), geometry, arch)
        for impl, impl_backend in impls:
            port = free_port()
            command, ready = server_command(impl, folder, port, impl_backend, max(concurrency))
            log(f"starting {impl} ({impl_backend})")
            with running(command, port, ready, threads):
                drive(port, 1, 1, 4, prompt)  # warm-up: first-call compilation, page faults
                for n in concurrency:
                    result = drive(port, n, per_client, max_tokens, prompt)
                    row = LoadRow(
                        impl, impl_backend, geometry, arch, n, n * per_client, len(result.errors), max_tokens,
                        result.tokens, round(result.wall, 3), round(sum(result.decode_tps), 2),
                        round(result.tokens / result.wall, 2), round(percentile(result.ttfts, 0.5), 3),
                        round(percentile(result.ttfts, 0.95), 3),
                    )  # fmt: skip
                    log(f"  {impl} c={n}: decode {row.aggregate_decode_tps} tok/s, output {row.output_tps} tok/s, "
                        f"ttft p50 {row.ttft_p50_s} s, p95 {row.ttft_p95_s} s, errors {row.errors}")  # fmt: skip
                    rows.append(row)
    return rows


def markdown(rows: list[LoadRow]) -> str:
    """A results table; x one stream = aggregate decode throughput over the same server's at concurrency 1."""
    single = {(r.impl, r.backend): r.aggregate_decode_tps for r in rows if r.concurrency == 1}
    lines = [
        "| impl | backend | model | concurrency | requests | errors | aggregate decode tok/s | x one stream | "
        "output tok/s | TTFT p50 s | TTFT p95 s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = single.get((r.impl, r.backend))
        speedup = f"{r.aggregate_decode_tps / base:.2f}" if base else "-"
        lines.append(
            f"| {r.impl} | {r.backend} | {r.geometry} ({r.arch}) | {r.concurrency} | {r.requests} | {r.errors} | "
            f"{r.aggregate_decode_tps:.2f} | {speedup} | {r.output_tps:.2f} | {r.ttft_p50_s:.3f} | {r.ttft_p95_s:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat_mlx.serve.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--geometry", default="d12")
    p.add_argument("--arch", default="g1", help="g1 when comparing with mlx-lm (its nanochat model is g1 math)")
    p.add_argument("--backend", default="torch", choices=("mlx", "torch"))
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated client counts")
    p.add_argument("--compare", default="", help="mlx-lm: the same load against mlx_lm.server on the same folder")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--per-client", type=int, default=2, help="requests each client streams in turn")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the servers (default: inherited)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    try:
        rows = run_serve_benchmark(
            args.geometry,
            args.arch,
            args.backend,
            tuple(int(c) for c in args.concurrency.split(",")),
            tuple(c for c in args.compare.split(",") if c),
            args.max_tokens,
            args.per_client,
            threads=args.threads,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
