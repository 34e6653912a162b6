"""The reference's optimizer recipe, backend-free: parameter groups, hyper-parameters, step logic.

nanochat (HEAD) trains with ``MuonAdamW``: AdamW for the embeddings, the unembedding and the
scalars, Muon (Polar Express orthogonalization, NorMuon variance reduction, cautious weight
decay) for every matrix inside the blocks, grouped by shape. This module decides which tensor
goes where with which settings and drives the steps; the array math of one AdamW or Muon update
comes from a backend (``mlx_backend.KERNELS``, ``torch_backend.KERNELS``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .rows import RowGrad

# Polar Express coefficients (a, b, c) per iteration: num_iters=5, safety_factor=2e-2, cushion=2
# (Amsel et al., https://arxiv.org/abs/2505.16932).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ADAMW_EPS = 1e-10
MUON_MOMENTUM, MUON_BETA2, MUON_NS_STEPS = 0.95, 0.9, 5
SMEAR_PARAMS = ("smear_gate.weight", "smear_lambda", "backout_lambda")


@dataclass
class ParamGroup:
    """One optimizer group: which tensors (canonical names) and how they are updated."""

    kind: str  # "adamw" or "muon"
    names: list[str]
    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.0, 0.0)  # AdamW
    eps: float = ADAMW_EPS  # AdamW
    momentum: float = MUON_MOMENTUM  # Muon
    beta2: float = MUON_BETA2  # Muon (second-moment EMA of the variance reduction)
    ns_steps: int = MUON_NS_STEPS  # Muon
    initial_lr: float = 0.0  # the lr a schedule multiplies
    rowwise: bool = False  # AdamW on an embedding table: gradients come as RowGrad, moments per touched row


def reference_groups(
    shapes: dict[str, tuple[int, ...]],
    n_embd: int,
    unembedding_lr: float,
    embedding_lr: float,
    matrix_lr: float,
    weight_decay: float,
    scalar_lr: float = 0.5,
    init_lr_frac: float = 1.0,
) -> list[ParamGroup]:
    """The reference's ``GPT.setup_optimizer`` groups for tensors of these canonical names and shapes.

    Groups whose tensors a generation lacks (lambdas before g3, smear before g9) are left out.
    Every lr is multiplied by ``init_lr_frac`` and recorded as the group's ``initial_lr``
    (``scripts/chat_sft.py``).
    """
    scale = (n_embd / 768) ** -0.5  # AdamW lrs tuned at width 768, scaled as 1/sqrt(width)

    def present(*names: str) -> list[str]:
        return [name for name in names if name in shapes]

    value_embeds = [name for name in shapes if name.startswith("value_embeds.")]
    groups = [
        ParamGroup("adamw", present("lm_head.weight"), unembedding_lr * scale, 0.01, (0.8, 0.96)),
        ParamGroup("adamw", present("transformer.wte.weight"), embedding_lr * scale, 0.001, (0.8, 0.995), rowwise=True),
        ParamGroup("adamw", value_embeds, embedding_lr * scale * 0.5, 0.01, (0.8, 0.995), rowwise=True),
        ParamGroup("adamw", present("resid_lambdas"), scalar_lr * 0.01, 0.05, (0.8, 0.95)),
        ParamGroup("adamw", present("x0_lambdas"), scalar_lr, 0.0, (0.96, 0.95)),  # higher beta1 for x0
        ParamGroup("adamw", present(*SMEAR_PARAMS), 0.2, 0.0, (0.8, 0.95)),
    ]
    matrices = [name for name in shapes if name.startswith("transformer.h.")]
    for shape in sorted({shapes[n] for n in matrices}):
        groups.append(ParamGroup("muon", [n for n in matrices if shapes[n] == shape], matrix_lr, weight_decay))
    groups = [g for g in groups if g.names]
    for group in groups:
        group.lr *= init_lr_frac
        group.initial_lr = group.lr
    return groups


class Kernels(Protocol):
    """One backend's array math for the updates. The results are returned; a backend may compute
    them in the arguments' memory (torch does, where that is exact), so callers pass arrays they own."""

    def zeros(self, shape: tuple[int, ...], like: Any) -> Any: ...

    def stack(self, arrays: list[Any]) -> Any: ...

    def unstack(self, array: Any) -> list[Any]: ...

    def take(self, array: Any, rows: np.ndarray) -> Any: ...  # a copy of array[rows]

    def put(self, array: Any, rows: np.ndarray, values: Any) -> Any: ...  # array with array[rows] = values

    def scale(self, array: Any, factor: float) -> Any: ...  # array * factor in float32, in array's dtype

    def adamw(self, p, g, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay) -> tuple: ...

    def muon(self, p, g, momentum_buffer, second_buffer, *, momentum, lr, weight_decay, beta2, ns_steps, red_dim): ...


class MuonAdamW:
    """The reference's MuonAdamW on one process: per-tensor AdamW, per-shape stacked Muon.

    ``update(params, grads, write)`` takes ``{canonical name: array}``s and hands the new weights
    to ``write``; state (moments,
    momentum buffers, step counts) lives here. Set ``group.lr`` / ``group.momentum`` between steps.
    The embedding tables (``rowwise`` groups) keep moments for the rows any step's ``RowGrad``
    touched (``state[name]["rows"]``): every other row's moments are zero, so its AdamW step is
    exactly 0 / (sqrt(0) + eps) = 0 and only the decoupled weight decay moves it, as in dense AdamW.
    (A dense gradient there counts every row as touched; a ``RowGrad`` elsewhere is made dense.)
    """

    def __init__(self, param_groups: list[ParamGroup], kernels: Kernels) -> None:
        self.param_groups = param_groups
        self.kernels = kernels
        self.state: dict[str, dict[str, Any]] = {}

    def update(self, params: dict[str, Any], grads: Mapping[str, Any], write: Callable[[dict[str, Any]], None]) -> None:
        """One step: each group's new arrays are handed to ``write`` as soon as they are computed, so a
        group's copies are gone before the next group's temporaries exist."""
        for group in self.param_groups:
            if group.kind == "muon":
                write(self._muon(group, [params[n] for n in group.names], [grads[n] for n in group.names]))
                continue
            for name in group.names:
                p, g = params[name], grads[name]
                if group.rowwise:
                    g = g if isinstance(g, RowGrad) else RowGrad(np.arange(g.shape[0]), g, tuple(g.shape))
                    write({name: self._adamw_rows(group, name, p, g)})
                else:
                    if isinstance(g, RowGrad):
                        g = self.kernels.put(self.kernels.zeros(g.shape, p), g.rows, g.values)
                    write({name: self._adamw(group, name, p, g)})

    def _adamw(self, group: ParamGroup, name: str, p: Any, g: Any) -> Any:
        k = self.kernels
        state = self.state.setdefault(
            name, {"step": 0, "exp_avg": k.zeros(p.shape, p), "exp_avg_sq": k.zeros(p.shape, p)}
        )
        return self._adamw_step(group, state, p, g)

    def _adamw_step(self, group: ParamGroup, state: dict[str, Any], p: Any, g: Any) -> Any:
        """One AdamW kernel call on ``p`` with ``state``'s moments (replaced) and step count (advanced)."""
        state["step"] += 1
        p, state["exp_avg"], state["exp_avg_sq"] = self.kernels.adamw(
            p,
            g,
            state["exp_avg"],
            state["exp_avg_sq"],
            step=state["step"],
            lr=group.lr,
            beta1=group.betas[0],
            beta2=group.betas[1],
            eps=group.eps,
            weight_decay=group.weight_decay,
        )
        return p

    def _adamw_rows(self, group: ParamGroup, name: str, p: Any, g: RowGrad) -> Any:
        k, width = self.kernels, p.shape[1]
        rows = g.rows
        state = self.state.get(name)
        if state is None:
            state = {"step": 0, "rows": rows, "exp_avg": k.zeros((len(rows), width), p)}
            state["exp_avg_sq"] = k.zeros((len(rows), width), p)
            self.state[name] = state
        elif not np.array_equal(state["rows"], rows):
            # Rows touched before keep stepping (with a zero gradient), as dense AdamW steps them.
            rows = np.union1d(state["rows"], rows)
            if len(rows) > len(state["rows"]):  # rows seen for the first time start from zero moments
                at = np.searchsorted(rows, state["rows"])
                for field in ("exp_avg", "exp_avg_sq"):
                    state[field] = k.put(k.zeros((len(rows), width), state[field]), at, state[field])
                state["rows"] = rows
        values = g.values
        if len(g.rows) < len(rows):
            values = k.put(k.zeros((len(rows), width), values), np.searchsorted(rows, g.rows), values)
        touched = self._adamw_step(group, state, k.take(p, rows), values)
        decay = 1 - group.lr * group.weight_decay
        return k.put(p if decay == 1 else k.scale(p, decay), rows, touched)

    def _muon(self, group: ParamGroup, params: list[Any], grads: list[Any]) -> dict[str, Any]:
        k = self.kernels
        rows, cols = params[0].shape
        state = self.state.get(group.names[0])
        if state is None:
            # The variance is tracked per row for tall (and square) matrices, per column for wide ones.
            second = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state = {
                "momentum_buffer": k.zeros((len(params), rows, cols), params[0]),
                "second": k.zeros(second, params[0]),
            }
            self.state[group.names[0]] = state
        stacked_grads = k.stack(grads)
        grads.clear()  # the group's gradients, now in the stack: their memory can go
        stacked, state["momentum_buffer"], state["second"] = k.muon(
            k.stack(params),
            stacked_grads,
            state["momentum_buffer"],
            state["second"],
            momentum=group.momentum,
            lr=group.lr * max(1.0, rows / cols) ** 0.5,  # tall matrices step further
            weight_decay=group.weight_decay,
            beta2=group.beta2,
            ns_steps=group.ns_steps,
            red_dim=-1 if rows >= cols else -2,
        )
        return dict(zip(group.names, k.unstack(stacked), strict=True))
