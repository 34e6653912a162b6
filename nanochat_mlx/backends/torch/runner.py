"""The engine's runner for the torch model: forward passes and sampling on the device."""

from __future__ import annotations

import sys

import torch

from ...sampling import Sampler, SamplingParams
from .cache import KVCache
from .model import TORCH_DTYPES, TorchGPT, choose_batch_kernels, device_name

try:
    import resource
except ImportError:  # Windows: no getrusage
    resource = None


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

    def prompt_logits(self, tokens: list[int], cache: KVCache) -> torch.Tensor:
        """Run a chunk like ``prefill``, keeping every position's logits (T, V): to score a prompt."""
        return self.model(self.tokens(tokens)[None], cache=cache)[0]

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model(tokens[:, None], cache=cache)[:, -1]

    def prepare_rows(self, max_rows: int) -> dict:
        """Before batched decoding of up to ``max_rows`` rows: measure the few-row products' kernels
        (row bucket -> weight shape -> kernel name)."""
        return choose_batch_kernels(self.model, max_rows)

    def decode_rows(self, tokens: list[int], caches: list[KVCache], lengths: list[int] | None = None) -> torch.Tensor:
        """One step of independent one-row caches at their own positions, each fed ``lengths[b]``
        of ``tokens`` (default one): logits (B, V) of each row's last token."""
        return self.model.decode_rows(self.tokens(tokens), caches, lengths)

    @torch.inference_mode()
    def clone_cache(self, cache: KVCache) -> KVCache:
        return cache.clone()

    def cache_bytes(self, cache: KVCache) -> int:
        return cache.nbytes

    @torch.inference_mode()
    def expand(self, cache: KVCache, logits: torch.Tensor, n: int) -> tuple[KVCache, torch.Tensor]:
        """Copy a one-row cache (and its logits) into ``n`` rows, as the reference's KVCache.prefill."""
        return cache.expand(n), logits.repeat(n, 1)

    def sampler(self, params: SamplingParams, rows: list[list[int]]) -> Sampler:
        """The sampling policy on torch tensors, for rows whose tokens so far are ``rows``."""
        return Sampler(TorchOps(self.model.device), params, rows)

    @property
    def pipelined(self) -> bool:
        """CUDA and MPS queue kernels asynchronously, so scheduling a step ahead overlaps work; on the
        CPU every call runs to completion, and a step ahead would only skew the decode clock."""
        return self.model.device.type != "cpu"

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


class TorchOps:
    """The sampling policy's primitives (``nanochat_mlx.sampling.ArrayOps``) on torch tensors."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def ids(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def rng(self, seed: int | None) -> torch.Generator | None:
        return torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None

    push = staticmethod(lambda h, col: torch.cat([h[:, 1:], col[:, None].to(h.dtype)], 1))
    gather = staticmethod(lambda logits, ids: logits.gather(-1, ids))
    scatter = staticmethod(lambda logits, ids, values: logits.scatter(-1, ids, values))
    where = staticmethod(torch.where)
    argmax = staticmethod(lambda logits: logits.argmax(-1))  # the first maximum, as the reference
    kth_largest = staticmethod(lambda logits, k: logits.topk(k, -1).values[..., -1:])
    softmax = staticmethod(lambda x: torch.softmax(x, -1))
    log_softmax = staticmethod(lambda x: torch.log_softmax(x.float(), -1))
    row_max = staticmethod(lambda x: x.amax(-1, keepdim=True))
    cumsum = staticmethod(lambda x: x.cumsum(-1))
    unsort = staticmethod(lambda values, order: torch.empty_like(values).scatter(-1, order, values))

    @staticmethod
    def sort_descending(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.sort(-1, descending=True)

    @staticmethod
    def top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x.topk(k, -1)

    @staticmethod
    def categorical(logits: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=rng)[:, 0]
