"""The engine's runner for the torch model: forward passes and sampling on the device."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch

from ...sampling import SamplingParams

try:
    import resource
except ImportError:  # Windows: no getrusage
    resource = None

from .cache import KVCache
from .model import TORCH_DTYPES, TorchGPT, device_name

REPETITION_CONTEXT = 20  # tokens the repetition penalty looks back over (mlx-lm's default, as the MLX runner)

# --- sampling -----------------------------------------------------------------------------------


def penalize(logits: torch.Tensor, histories: list[list[int]], penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of each row's recent tokens by ``penalty``."""
    logits = logits.clone()
    for row, history in enumerate(histories):
        ids = torch.tensor(sorted(set(history[-REPETITION_CONTEXT:])), dtype=torch.long, device=logits.device)
        if ids.numel():
            chosen = logits[row, ids]
            logits[row, ids] = torch.where(chosen < 0, chosen * penalty, chosen / penalty)
    return logits


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores to sample from with ``softmax(scores / temperature)`` (dropped tokens: -inf), and their ids.

    Top-p, min-p and top-k each keep a prefix of the tokens ordered by probability, so only the
    top-k (or, without top-k, all tokens sorted) need ordering; top-p is measured on the full
    distribution, as the MLX runner does. Without any filter: the logits themselves, ids None.
    """
    vocab = logits.shape[-1]
    top_k = params.top_k if params.top_k and params.top_k < vocab else None
    if top_k is None and params.top_p >= 1.0 and params.min_p <= 0.0:
        return logits, None
    scores, ids = logits.topk(top_k, -1) if top_k else logits.sort(-1, descending=True)
    if params.top_p < 1.0:
        probs = (scores - logits.logsumexp(-1, keepdim=True)).exp()
        # Keep a token while the mass of the more likely ones is below top_p (the first always).
        scores = scores.masked_fill(probs.cumsum(-1) - probs >= params.top_p, -math.inf)
    if params.min_p > 0.0:  # p >= min_p * p_max, in logits
        scores = scores.masked_fill(scores < scores[..., :1] + math.log(params.min_p), -math.inf)
    return scores, ids


# --- the engine's runner ------------------------------------------------------------------------


class TorchRunner:
    """The engine's view of a torch model: forward passes and sampling stay on the device."""

    name = "torch"

    def __init__(self, model: TorchGPT) -> None:
        self.model = model
        self.device = device_name(model.device)
        self.dtype = {v: k for k, v in TORCH_DTYPES.items()}[model.dtype]
        self.context_limit = model.config.context_limit

    def make_cache(self) -> KVCache:
        return self.model.make_cache()

    def cache_length(self, cache: KVCache) -> int:
        return cache.length

    def prefill(self, tokens: list[int], cache: KVCache) -> torch.Tensor:
        ids = torch.tensor([tokens], dtype=torch.long, device=self.model.device)
        return self.model(ids, cache=cache, last_only=True)[:, -1]

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model(tokens[:, None], cache=cache)[:, -1]

    def decode_rows(self, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
        """One decode step of independent one-row caches at their own positions: logits (B, V)."""
        return self.model.decode_rows(self.tokens(tokens), caches)

    @torch.inference_mode()
    def clone_cache(self, cache: KVCache) -> KVCache:
        return cache.clone()

    def cache_bytes(self, cache: KVCache) -> int:
        return cache.nbytes

    @torch.inference_mode()
    def expand(self, cache: KVCache, logits: torch.Tensor, n: int) -> tuple[KVCache, torch.Tensor]:
        """Copy a one-row cache (and its logits) into ``n`` rows, as the reference's KVCache.prefill."""
        return cache.expand(n), logits.repeat(n, 1)

    def sampler(self, params: SamplingParams) -> Callable[[torch.Tensor, list[list[int]] | None], torch.Tensor]:
        """(logits (B, V), row histories or None) -> ids (B,) on the device."""
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        penalty = params.repetition_penalty

        @torch.inference_mode()
        def sample(logits: torch.Tensor, histories: list[list[int]] | None) -> torch.Tensor:
            if penalty != 1.0 and histories:
                logits = penalize(logits, histories, penalty)
            if params.greedy:
                return logits.argmax(-1)  # the first maximum, as the reference
            scores, ids = candidates(logits, params)
            probs = torch.softmax(scores / params.temperature, -1)
            choice = torch.multinomial(probs, 1, generator=generator)
            return (choice if ids is None else ids.gather(-1, choice))[:, 0]

        return sample

    def tokens(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.model.device)

    def schedule(self, ids: torch.Tensor) -> None:
        """Nothing to do: CUDA already runs queued kernels asynchronously; to_list waits for them."""

    def to_list(self, ids: torch.Tensor) -> list[int]:
        return ids.tolist()

    def trim(self, cache: KVCache, n: int) -> bool:
        return self.model.trim_cache(cache, n)

    def reset_peak_memory(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.model.device)

    def peak_memory(self) -> int:
        """Peak CUDA allocation; Metal's current allocation; on the CPU the process's peak RSS."""
        kind = self.model.device.type
        if kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self.model.device))
        if kind == "mps":
            return int(torch.mps.driver_allocated_memory())
        if resource is None:
            return 0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB
