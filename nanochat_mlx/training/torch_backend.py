"""Training on the torch model: gradients flow through its fused layout and come back canonical.

``TorchGPT`` keeps each layer's q, k, v (and value-embedding gate) in one ``c_qkv`` matrix; its
``canonical`` splits that (and its gradient) into views with the reference's names and shapes,
so the optimizer updates the reference's tensors and writing them back updates the model in place.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.torch.model import TorchGPT
from .optim import POLAR_EXPRESS
from .rows import RowGrad


def parameters(model: TorchGPT) -> dict[str, torch.Tensor]:
    """Canonical views of the model's weights (detached: updates go through ``assign``)."""
    return model.canonical({name: p.detach() for name, p in model.named_parameters()})


@torch.no_grad()
def assign(model: TorchGPT, params: dict[str, torch.Tensor]) -> None:
    """Write these canonical tensors (some or all) into the model."""
    views = parameters(model)
    for name, value in params.items():
        if value.data_ptr() != views[name].data_ptr():  # one computed in the weight's own memory is there
            views[name].copy_(value)


def loss_and_grads(model: TorchGPT, inputs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, dict]:
    """The loss and every gradient; the embedding tables' as ``RowGrad`` (the batch's rows only)."""
    rows, inverse = np.unique(inputs, return_inverse=True)
    index = torch.from_numpy(rows).to(model.device)
    tables = {"transformer.wte.weight": model.transformer.wte}
    tables.update({f"value_embeds.{key}.weight": module for key, module in model.value_embeds.items()})
    full = {name: module.weight for name, module in tables.items()}
    x = torch.as_tensor(inverse.reshape(inputs.shape), dtype=torch.long, device=model.device)
    y = torch.as_tensor(targets, dtype=torch.long, device=model.device)
    try:
        # Each table swapped for its batch's rows, looked up by position among them: the gradient
        # of those rows is the table's whole gradient, and the table's own is never materialized.
        for name, module in tables.items():
            module.weight = torch.nn.Parameter(full[name][index], requires_grad=False)
        params = dict(model.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        logits = model.compute(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1)
        loss.backward()
        # The padding columns of a fused value-embedding gate get gradients too; split() drops them.
        grads = model.canonical({name: p.grad for name, p in params.items()})
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for name, module in tables.items():
            module.weight = full[name]
    for name in tables:
        grads[name] = RowGrad(rows, grads[name], tuple(full[name].shape))
    return loss.detach(), grads


def from_numpy(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``array`` on ``like``'s device in its dtype; a float32 CPU model shares the array's memory."""
    host = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return host.to(device=like.device, dtype=like.dtype)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float32 copy (``.numpy()`` alone would share memory with a CPU model's live weights)."""
    return np.array(tensor.detach().float().cpu().numpy())


def _norm(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.norm(dim=dims, keepdim=True)


class TorchKernels:
    """The AdamW and Muon updates in float32 torch ops."""

    def zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def stack(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(arrays)

    def unstack(self, array: torch.Tensor) -> list[torch.Tensor]:
        return list(array.unbind(0))

    def take(self, array: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return array[torch.from_numpy(rows).to(array.device)]

    @torch.no_grad()
    def put(self, array: torch.Tensor, rows: np.ndarray, values: torch.Tensor) -> torch.Tensor:
        array[torch.from_numpy(rows).to(array.device)] = values.to(array.dtype)
        return array

    @torch.no_grad()
    def scale(self, array: torch.Tensor, factor: float) -> torch.Tensor:
        if array.dtype == torch.float32:
            return array.mul_(factor)
        return array.copy_(array.float() * factor)

    @torch.no_grad()
    def adamw(self, p, g, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay):
        dtype, g = p.dtype, g.float()
        if dtype == exp_avg.dtype == exp_avg_sq.dtype == torch.float32:
            # In place (a d20 model's lm_head is 335 MB a copy): the same operations in the same order.
            p, exp_avg, exp_avg_sq = p.mul_(1 - lr * weight_decay), exp_avg.lerp_(g, 1 - beta1), exp_avg_sq
            exp_avg_sq.lerp_(g.square(), 1 - beta2)
        else:
            p = p.float() * (1 - lr * weight_decay)  # decoupled weight decay, before the update
            exp_avg = exp_avg.float().lerp(g, 1 - beta1)  # the moments are kept in float32
            exp_avg_sq = exp_avg_sq.float().lerp(g.square(), 1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
        p.sub_(torch.div(exp_avg, denom, out=denom).mul_(lr / (1 - beta1**step)))
        return p.to(dtype), exp_avg, exp_avg_sq

    @torch.no_grad()
    def muon(self, p, g, momentum_buffer, second_buffer, *, momentum, lr, weight_decay, beta2, ns_steps, red_dim):
        # p and g are stacked copies (the optimizer's own): the update is computed in their memory, each
        # step the same operation in the same order as the reference's (a d20 group is 0.5 GB a copy).
        dtype = p.dtype
        momentum_buffer.lerp_(g, 1 - momentum)
        x = g.lerp_(momentum_buffer, momentum).float()  # Nesterov
        # MuonEq: every row rescaled to the mean row norm before orthogonalizing.
        target = _norm(x, (-2, -1)) / (x.shape[-2] ** 0.5)
        x.mul_(target / _norm(x, (-1,)).clamp_min(1e-6))
        x.div_(_norm(x, (-2, -1)) * 1.01 + 1e-6)
        tall = x.shape[-2] > x.shape[-1]
        for a, b, c in POLAR_EXPRESS[:ns_steps]:
            if tall:
                A = x.mT @ x
                y = x @ (b * A + c * (A @ A))
            else:
                A = x @ x.mT
                y = (b * A + c * (A @ A)) @ x
            x = y.add_(x.mul_(a))  # a * x + y
        x = x.to(p.dtype)
        # Muon+: snap the Frobenius norm to that of a semi-orthogonal matrix.
        x.mul_(min(x.shape[-2], x.shape[-1]) ** 0.5 / _norm(x.float(), (-2, -1)).clamp_min(1e-6))
        # NorMuon: per-row (or per-column) step sizes from a second-moment EMA, total norm kept.
        v_mean = x.float().square().mean(dim=red_dim, keepdim=True)
        size = x.shape[red_dim]
        v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
        second_buffer = second_buffer.lerp(v_mean.to(second_buffer.dtype), 1 - beta2)
        step_size = second_buffer.clamp_min(1e-10).rsqrt()
        v_norm_new = (v_mean * size * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        x.mul_(step_size * (v_norm / v_norm_new.clamp_min(1e-10)))
        # Cautious weight decay: only where the update and the weight agree in sign (none at 0: SFT's).
        mask = (x * p) >= 0 if weight_decay else None
        update = x.mul_(lr)
        if weight_decay:
            update.add_(lr * weight_decay * p * mask)
        return p.sub_(update).to(dtype), momentum_buffer, second_buffer


KERNELS = TorchKernels()
