"""Worker for tests/test_reference_training.py: one generation's own training code, on CPU in float32.

Run by path with ``PYTHONPATH`` set to an extracted tree of the generation's commit (nothing of
nanochat-mlx is importable here, nor imported). ``NANOCHAT_BASE_DIR`` is set to each checkpoint
folder before it is loaded (``build_model``'s ``get_tokenizer`` reads its ``tokenizer/``).
``argv[1]`` is a JSON job:

- ``cases``: ``{"checkpoint", "step", "batch", "out"}`` each: the model ``build_model`` loads from
  the native folder ``checkpoint`` (phase "train"), the ``inputs``/``targets`` of the ``batch`` npz;
  ``out`` gets ``loss`` and, per state-dict name, ``grad/<name>`` after ``model(x, y).backward()``.
- ``steps`` (optional, HEAD only), each ``{"checkpoint", "step", "batches", "out", "optimizer",
  "init_lr_frac", "schedule"}``: ``setup_optimizer(**optimizer)`` + ``MuonAdamW`` run eagerly
  (TORCHDYNAMO_DISABLE=1), lrs scaled by ``init_lr_frac`` as ``scripts/chat_sft.py`` does, one step
  per ``[lr_multiplier, muon_momentum]`` of ``schedule``, step k on the k-th of ``batches``;
  ``out`` gets ``step<k>/<name>`` (the gradient of step k), ``weight/<name>`` (after the last
  step), ``losses``, and ``out`` + ".json" the optimizer's param groups (names instead of tensors).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from nanochat.checkpoint_manager import build_model

CPU = torch.device("cpu")


def load(folder: str, step: int):
    os.environ["NANOCHAT_BASE_DIR"] = folder
    model, _, _ = build_model(folder, step, CPU, "train")
    return model


def batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(path)
    return torch.tensor(data["inputs"]), torch.tensor(data["targets"])


def grads(model) -> dict[str, np.ndarray]:
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).float().numpy().copy()
        for name, p in model.named_parameters()
    }


def gradients(case: dict) -> None:
    model = load(case["checkpoint"], case["step"])
    x, y = batch(case["batch"])
    loss = model(x, y)
    loss.backward()
    np.savez(case["out"], loss=np.float64(loss.item()), **{f"grad/{k}": v for k, v in grads(model).items()})


def steps(job: dict) -> None:
    model = load(job["checkpoint"], job["step"])
    optimizer = model.setup_optimizer(**job["optimizer"])
    for group in optimizer.param_groups:  # chat_sft.py
        group["lr"] = group["lr"] * job["init_lr_frac"]
        group["initial_lr"] = group["lr"]
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "names": [names[id(p)] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    losses, out = [], {}
    for k, ((lrm, momentum), path) in enumerate(zip(job["schedule"], job["batches"], strict=True), 1):
        x, y = batch(path)
        model.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        out.update({f"step{k}/{name}": g for name, g in grads(model).items()})
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
        optimizer.step()
    out.update({f"weight/{name}": t.detach().float().numpy() for name, t in model.state_dict().items()})
    np.savez(job["out"], losses=np.array(losses, dtype=np.float64), **out)
    Path(job["out"] + ".json").write_text(json.dumps(groups, indent=2) + "\n")


def main() -> None:
    torch.manual_seed(0)
    job = json.loads(Path(sys.argv[1]).read_text())
    for case in job["cases"]:
        gradients(case)
    for run in job.get("steps", []):
        steps(run)


if __name__ == "__main__":
    main()
