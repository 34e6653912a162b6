"""Write fixtures/training/<gen>/: what the reference itself computes when training each fixture.

For every generation g1..g9 this extracts that generation's commit of karpathy/nanochat from the
git mirror into a temporary tree, loads ``fixtures/<gen>`` with that commit's own
``checkpoint_manager.build_model`` (CPU, float32) in a fresh process, and records

- ``grads.npz``: the batch (``inputs``, ``targets``) and, per state-dict name, the gradient of
  ``model(inputs, targets)`` (mean cross-entropy, targets -1 ignored) after ``loss.backward()``;
- ``expected.json``: that loss, the commit, the torch version;
- g9 (HEAD) also ``steps.npz``/``steps.json``: the weights after three steps of HEAD's
  ``setup_optimizer`` + ``MuonAdamW`` (run eagerly: TORCHDYNAMO_DISABLE=1), with the learning
  rates scaled by ``init_lr_frac`` as ``scripts/chat_sft.py`` does, and the losses before each
  step, and the optimizer's param groups; ``step_grads.npz``: the reference's gradients at steps 2 and 3.

The batch (seed) is one on which no weight sits on a float32 knife edge after three steps. Two
kinds exist: cautious weight decay applies ``lr*wd*p`` only where ``update*p >= 0``, so an
element whose Muon update rounds to about zero decays or not by rounding alone; and AdamW's
``eps=1e-10`` makes the first step ``lr*g/(|g|+1e-10)``, so a gradient element of ~1e-10 (a
cancellation, below float32 noise of its tensor) moves by a fraction of ``lr`` that rounding
decides. Any two float32 implementations (the reference on two devices too) differ there by up to
``lr*wd*|p|`` or a fraction of ``lr``. Of seeds 0-7, six put one element 1.2e-4 to 7.3e-4 off
on some backend; seed 2 (max 1.4e-5) and seed 3 (9.6e-5) did not. The optimizer arithmetic
itself is checked by feeding it the reference's own gradients, which removes the gradient side of
the caveat but not all of it: an element whose Muon update is below the update's own float32
rounding (~1e-6) still decays or not by rounding (tests/test_reference_training.py measures it).

Usage: ``python tests/make_training_expected.py [--mirror PATH] [gen ...]`` (needs torch and the mirror).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
OUT = FIXTURES / "training"
# A git mirror (bare clone) of karpathy/nanochat; $NANOCHAT_REFERENCE_MIRROR points elsewhere.
MIRROR = Path(os.environ.get("NANOCHAT_REFERENCE_MIRROR", "/work/.mirror/karpathy+nanochat/repo"))
COMMITS = {
    "g1": "d5759400f96789d7649e040e5f444790101baa21",
    "g2": "2c4473dd1b608a403700b098f867b202c2a03522",
    "g3": "201d705957a4b44074c41544afc0f9f76a20f775",
    "g4": "d58fcd9d7331efba0224d59e026833738e7547a6",
    "g5": "83dccc20aeab357ae4bb30d9c2ce938763efa929",
    "g6": "752abc836e7075d3a799e2af8f82bdb2456c60cc",
    "g7": "1076f97059785ed6d763706bf2304ce7721ab75c",
    "g8": "f06860494848db080c9a80a0ffa83203b042056b",
    "g9": "92d63d4e8bb4df75c3b71618f31ddde2378b2bcd",
}
STEP = 500
B, T, VOCAB, SEED = 2, 16, 400, 2
# The optimizer run (HEAD only): setup_optimizer's arguments, chat_sft's init_lr_frac, and the
# per-step lr multiplier and Muon momentum (chat_sft's schedules move both).
OPTIMIZER = dict(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.1, scalar_lr=0.5)
INIT_LR_FRAC = 0.8
SCHEDULE = [(1.0, 0.85), (0.8, 0.9), (0.6, 0.95)]


def batch():
    """The fixed batch: random ids, next-token targets, some ignored (-1)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, VOCAB, size=(B, T + 1))
    inputs, targets = ids[:, :-1].copy(), ids[:, 1:].copy()
    targets[0, :5] = -1  # a masked prompt, as chat SFT masks the user's turns
    targets[1, 11:] = -1  # padding at the end of a short row
    return inputs, targets


def worker(gen: str, out: Path) -> None:
    """Runs inside the extracted tree of ``gen``'s commit (on sys.path)."""
    import numpy as np
    import torch
    from nanochat.checkpoint_manager import build_model

    torch.manual_seed(0)
    device = torch.device("cpu")
    inputs, targets = batch()
    x, y = torch.tensor(inputs), torch.tensor(targets)

    model, _, _ = build_model(str(FIXTURES / gen), STEP, device, "train")
    loss = model(x, y)
    loss.backward()
    grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).float().numpy()
        for name, p in model.named_parameters()
    }
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "grads.npz", inputs=inputs, targets=targets, **{f"grad/{k}": v for k, v in grads.items()})
    info = {"generation": gen, "commit": COMMITS[gen], "torch": torch.__version__, "loss": loss.item()}
    (out / "expected.json").write_text(json.dumps(info, indent=2) + "\n")

    if gen != "g9":
        return
    model, _, _ = build_model(str(FIXTURES / gen), STEP, device, "train")
    optimizer = model.setup_optimizer(**OPTIMIZER)
    for group in optimizer.param_groups:  # chat_sft.py
        group["lr"] = group["lr"] * INIT_LR_FRAC
        group["initial_lr"] = group["lr"]
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "names": [names[id(p)] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    losses, step_grads = [], {}
    for step, (lrm, momentum) in enumerate(SCHEDULE, 1):
        model.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        if step > 1:  # step 1's are grads.npz
            step_grads.update({f"step{step}/{name}": p.grad.numpy().copy() for name, p in model.named_parameters()})
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
        optimizer.step()
    weights = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    np.savez_compressed(out / "steps.npz", **weights)
    np.savez_compressed(out / "step_grads.npz", **step_grads)
    run = {
        "optimizer": OPTIMIZER,
        "init_lr_frac": INIT_LR_FRAC,
        "schedule": [{"lr_multiplier": lrm, "muon_momentum": m} for lrm, m in SCHEDULE],
        "losses": losses,
        "param_groups": groups,
    }
    (out / "steps.json").write_text(json.dumps(run, indent=2) + "\n")


def extract(gen: str, mirror: Path, dest: Path) -> Path:
    """Extract the ``nanochat`` package of ``gen``'s commit from the mirror into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(mirror), "archive", COMMITS[gen], "nanochat"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_generation(gen: str, mirror: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tree, base = extract(gen, mirror, Path(tmp) / "tree"), Path(tmp) / "base"
        base.mkdir()
        (base / "tokenizer").symlink_to(FIXTURES / gen / "tokenizer")
        env = dict(os.environ, PYTHONPATH=str(tree), NANOCHAT_BASE_DIR=str(base), TORCHDYNAMO_DISABLE="1")
        subprocess.run(
            [sys.executable, __file__, "--worker", gen], env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL
        )
    print(f"{gen}: wrote {OUT / gen}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gens", nargs="*", default=list(COMMITS))
    parser.add_argument("--mirror", type=Path, default=MIRROR)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, OUT / args.worker)
        return
    for gen in args.gens:
        run_generation(gen, args.mirror)


if __name__ == "__main__":
    main()
