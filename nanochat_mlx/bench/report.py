"""Output: result rows, the machine facts every result file carries, Markdown (ratios first), the plot."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROW_KEYS = (
    "impl", "backend", "device", "dtype", "quantize", "geometry", "arch", "prompt_tokens", "decode_tokens",
    "context", "prefill_tps", "decode_tps", "own_decode_tps", "ttft_s", "peak_memory_bytes", "weight_bytes",
    "bandwidth_gbps", "threads", "roofline_decode_tps", "trials", "greedy_match",
)  # fmt: skip


@dataclass
class Row:
    """One measured configuration at one prompt length (medians over ``trials``)."""

    impl: str
    backend: str
    device: str
    dtype: str
    quantize: int | None
    geometry: str
    arch: str
    prompt_tokens: int
    decode_tokens: int
    context: int  # mean context length while decoding
    prefill_tps: float
    decode_tps: float  # outside clock: (n - 1) / (Tn - T1)
    own_decode_tps: float | None  # the implementation's own clock, where it has one
    ttft_s: float
    peak_memory_bytes: int | None
    weight_bytes: int | None  # unquantized rows only
    bandwidth_gbps: float
    threads: int
    roofline_decode_tps: float | None  # unquantized rows only
    trials: int
    per_trial: dict[str, list[float]] = field(default_factory=dict)  # prefill_tps, decode_tps, ... in trial order
    load_cold_s: float | None = None
    load_warm_s: float | None = None
    tokens: list[int] = field(default_factory=list)  # greedy tokens of the last trial
    greedy_match: float | None = None  # share of tokens equal to the reference's before they first differ
    quality: dict[str, float] | None = None

    @property
    def roofline_fraction(self) -> float | None:
        return self.decode_tps / self.roofline_decode_tps if self.roofline_decode_tps else None


def machine_facts(bandwidth: float, threads: int, reference_repo: Path | None = None) -> dict[str, Any]:
    """CPU, cores, decoder threads, bandwidth, memory and library versions (and the reference's commit)."""
    facts: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "bandwidth_gbps": round(bandwidth, 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        facts["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for dist in ("nanochat-mlx", "mlx", "mlx-lm", "numpy", "torch"):
        try:
            facts[dist] = version(dist)
        except PackageNotFoundError:
            pass
    if reference_repo is not None:
        facts["reference_repo"] = str(reference_repo)
        facts["reference_commit"] = _git_commit(reference_repo)
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def _paired(ours: Row, other: Row, key: str, invert: bool = False) -> str:
    """Median and range of the per-trial ratios ours / other (trial i of both ran back to back)."""
    pairs = zip(ours.per_trial.get(key) or [], other.per_trial.get(key.removeprefix("own_")) or [], strict=False)
    ratios = sorted((b / a if invert else a / b) for a, b in pairs if a and b)
    if not ratios:
        return "-"
    median = statistics.median(ratios)
    return f"{median:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else f"{median:.2f}x"


def markdown(rows: list[Row], facts: dict[str, Any]) -> str:
    """Machine facts, then ratios (ours / other, same dtype, quantization and prompt), then every row.

    Ratios are paired: the median (and range) over trials of ours / other within the same trial, which
    ran back to back, so load from elsewhere on the machine hits both sides of a pair alike."""
    out = [_facts_line(facts), ""]
    ratios = []
    for r in rows:
        if r.impl != "nanochat-mlx":
            continue
        for o in rows:
            if o.impl != "nanochat-mlx" and (o.dtype, o.quantize, o.prompt_tokens) == (
                r.dtype,
                r.quantize,
                r.prompt_tokens,
            ):
                same = f"{100 * r.greedy_match:.0f}%" if r.greedy_match is not None and o.impl == "reference" else "-"
                ratios.append(
                    f"| nanochat-mlx ({r.backend}) / {o.impl} ({o.backend}) | {r.dtype} | {r.quantize or '-'} "
                    f"| {r.prompt_tokens} | {r.context} | {_paired(r, o, 'prefill_tps')} "
                    f"| **{_paired(r, o, 'decode_tps')}** | {_paired(r, o, 'own_decode_tps')} "
                    f"| {_paired(r, o, 'ttft_s', invert=True)} | {same} |"
                )
    if ratios:
        out += [
            "| ratio (higher = ours faster; paired median, min-max) | dtype | quant | prompt | ctx | prefill | decode "
            "| decode, our engine's clock | TTFT | same greedy tokens |",
            "|" + "---|" * 10,
            *ratios,
            "",
        ]
    out += [
        "| impl | backend | dtype | quant | prompt | ctx | prefill tok/s | decode tok/s (min-max) | own clock tok/s "
        "| TTFT s | peak MiB | weights MiB | roofline tok/s | % roofline | load cold/warm s | trials |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        peak = f"{r.peak_memory_bytes / 2**20:.0f}" if r.peak_memory_bytes else "n/a"
        weights = f"{r.weight_bytes / 2**20:.0f}" if r.weight_bytes else "n/a"
        roof = (
            f"{r.roofline_decode_tps:.1f} | {100 * r.roofline_fraction:.0f}%" if r.roofline_decode_tps else "n/a | n/a"
        )
        own = f"{r.own_decode_tps:.2f}" if r.own_decode_tps else "-"
        warm = f"{r.load_warm_s:.2f}" if r.load_warm_s is not None else "-"
        decode = r.per_trial.get("decode_tps") or [r.decode_tps]
        out.append(
            f"| {r.impl} | {r.backend} | {r.dtype} | {r.quantize or '-'} | {r.prompt_tokens} | {r.context} "
            f"| {r.prefill_tps:.1f} | {r.decode_tps:.2f} ({min(decode):.2f}-{max(decode):.2f}) "
            f"| {own} | {r.ttft_s:.2f} | {peak} | {weights} | {roof} | {r.load_cold_s or 0:.2f}/{warm} | {r.trials} |"
        )
    quality_rows = {(r.backend, r.dtype, r.quantize): r.quality for r in rows if r.quality}
    if quality_rows:
        out += [
            "",
            "| quantization | backend | dtype | mean abs dlogit | mean abs logit | greedy agreement |",
            "|---|---|---|---|---|---|",
        ]
        for (backend, dtype, bits), q in sorted(quality_rows.items()):
            out.append(
                f"| {bits}-bit | {backend} | {dtype} | {q['mean_abs_dlogit']:.4f} | {q['mean_abs_logit']:.3f} "
                f"| {100 * q['greedy_agreement']:.1f}% |"
            )
    return "\n".join(out) + "\n"


def _facts_line(facts: dict[str, Any]) -> str:
    parts = [
        f"CPU: {facts['cpu']}, {facts['cores']} cores; decoder threads {facts['threads']}; "
        f"read bandwidth {facts['bandwidth_gbps']} GB/s ({facts['threads']} threads)"
    ]
    versions = [f"{k} {facts[k]}" for k in ("python", "torch", "mlx", "mlx-lm", "numpy") if k in facts]
    parts.append("versions: " + ", ".join(versions))
    if "reference_commit" in facts:
        parts.append(f"reference: {facts['reference_repo']} at {facts['reference_commit']}")
    return "; ".join(parts) + "."


def plot(rows: list[Row], path: Path) -> bool:
    """Decode and prefill tok/s vs context per implementation; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: --plot needs matplotlib (pip install matplotlib); no plot written", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[Row]] = {}
    for r in rows:
        series.setdefault(f"{r.impl} {r.backend} {r.dtype}{f' q{r.quantize}' if r.quantize else ''}", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r.context)
        ax1.plot([r.context for r in rs], [r.decode_tps for r in rs], marker="o", label=label)
        ax2.plot([r.prompt_tokens for r in rs], [r.prefill_tps for r in rs], marker="o", label=label)
    geometry = rows[0].geometry if rows else ""
    for ax, title, xl in ((ax1, "decode", "context (tokens)"), (ax2, "prefill", "prompt (tokens)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xl)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} — {geometry}")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
