"""Data parallelism across processes: ``mlx.launch`` (mx.distributed) or ``torchrun`` (torch.distributed).

The trainer sums numpy arrays across processes through a :class:`World`; which library carries
them is decided by the launcher's environment (``MLX_RANK`` / ``WORLD_SIZE``), not by the model's
backend, so either backend trains under either launcher. One process: a World of size 1.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import NanochatError
from .rows import RowGrad


class World:
    """This process's rank among ``size`` processes, and a sum over all of them."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints progress."""
        return self.rank == 0

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        return array


class MLXWorld(World):
    def __init__(self) -> None:
        import mlx.core as mx

        self._mx = mx
        self._group = mx.distributed.init(strict=True)
        super().__init__(self._group.rank(), self._group.size())

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        # On the CPU stream: the ring and MPI backends reduce there.
        total = self._mx.distributed.all_sum(self._mx.array(array), group=self._group, stream=self._mx.cpu)
        return np.array(total)


class TorchWorld(World):
    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        super().__init__(dist.get_rank(), dist.get_world_size())

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array))
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
        return tensor.numpy()


def init_world() -> World:
    """The World this process was launched into (size 1 without a launcher)."""
    try:
        if "MLX_RANK" in os.environ:
            return MLXWorld()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return TorchWorld()
    except (RuntimeError, ValueError) as e:
        raise NanochatError(f"cannot join the other processes: {e}") from None
    return World()


MESSAGE = 1 << 26  # float32 values per message: the sum never holds a second copy of all gradients


def sum_arrays(world: World, arrays: dict[str, np.ndarray | RowGrad]) -> dict[str, np.ndarray | RowGrad]:
    """Every array summed over the processes, in float32 messages of up to ``MESSAGE`` values.

    A ``RowGrad`` is first widened to the union of every process's rows (a vocabulary-long count
    summed across them), so that all processes send the same rows. The sums replace the arrays in
    ``arrays`` as they arrive (each process's own copy is freed as it goes), which is returned.
    """
    if world.size == 1:
        return arrays
    sparse = [name for name, a in arrays.items() if isinstance(a, RowGrad)]
    if sparse:
        counts = np.concatenate([_touched(arrays[name]) for name in sparse])
        counts, offset = world.all_sum(counts), 0
        for name in sparse:
            g = arrays[name]
            rows = np.flatnonzero(counts[offset : offset + g.shape[0]])
            arrays[name] = RowGrad(rows, g.on(rows), g.shape)
            offset += g.shape[0]
    flat = {name: (a.values if isinstance(a, RowGrad) else a) for name, a in arrays.items()}
    batch: list[str] = []
    for name in [*flat, None]:
        if batch and (name is None or sum(flat[n].size for n in batch) + flat[name].size > MESSAGE):
            total = world.all_sum(np.concatenate([flat[n].reshape(-1).astype(np.float32, copy=False) for n in batch]))
            offset = 0
            for n in batch:
                local = flat.pop(n)
                summed = total[offset : offset + local.size].reshape(local.shape)
                a = arrays[n]
                arrays[n] = RowGrad(a.rows, summed, a.shape) if isinstance(a, RowGrad) else summed
                offset += local.size
            batch = []
        if name is not None:
            batch.append(name)
    return arrays


def _touched(g: RowGrad) -> np.ndarray:
    counts = np.zeros(g.shape[0], np.float32)
    counts[g.rows] = 1
    return counts
