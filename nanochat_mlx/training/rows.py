"""Row gradients of the input-embedding tables: only the rows of the batch's token ids are non-zero.

``transformer.wte`` and the value-embedding tables are looked up by token id, so a batch's gradient
of a (vocab x d) table is zero outside the rows of the ids it holds. A d20 g9 model's eleven such
tables are 0.9B of its 1.26B parameters; carrying their gradients (and AdamW moments, see
``optim.MuonAdamW``) as those rows alone is what lets its full fine-tuning fit in 24 GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def is_embedding(name: str) -> bool:
    """Whether a canonical tensor is a table looked up by token id (its gradient comes as rows)."""
    return name == "transformer.wte.weight" or name.startswith("value_embeds.")


@dataclass
class RowGrad:
    """The gradient of a ``shape`` table that is zero outside ``rows`` (sorted, unique row ids).

    ``values`` (len(rows) x shape[1]) is a backend array or a float32 numpy array.
    """

    rows: np.ndarray
    values: Any
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> RowGrad:
        """The non-zero rows of a dense gradient (the rows left out get exactly the dense update)."""
        rows = np.flatnonzero(np.any(dense != 0, axis=1))
        return cls(rows, dense[rows], tuple(dense.shape))

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        out[self.rows] = self.values
        return out

    def on(self, rows: np.ndarray) -> np.ndarray:
        """The (numpy) values on ``rows``, a sorted superset of ``self.rows``: zero on the new ones."""
        if len(rows) == len(self.rows):
            return self.values
        out = np.zeros((len(rows), self.shape[1]), np.float32)
        out[np.searchsorted(rows, self.rows)] = self.values
        return out

    def __iadd__(self, other: RowGrad) -> RowGrad:
        """Sum in place (numpy values): the rows become the union."""
        if not np.array_equal(self.rows, other.rows):
            rows = np.union1d(self.rows, other.rows)
            self.values, self.rows = self.on(rows), rows
            self.values[np.searchsorted(rows, other.rows)] += other.values
        else:
            self.values += other.values
        return self
