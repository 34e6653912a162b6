"""Worker for tests/test_reference_geometries.py: the reference's own outputs on native folders.

Run by path, with an extracted tree of one karpathy/nanochat commit first on ``PYTHONPATH``; it
imports nothing of nanochat-mlx. ``python reference_geometry_worker.py JOB OUT`` reads the JSON
list of cases in JOB and writes ``OUT/<name>.npz`` for each. A case names a native ``folder``
(model_<step>.pt, meta_<step>.json, tokenizer/tokenizer.pkl) and the ``step``; for it the
reference's ``checkpoint_manager.build_model`` (CPU, float32, as its own scripts load a model)
computes

- ``full``: the logits of ``model(ids[None])`` for the ``prompt`` (T > 1: g9 asserts it);
- ``kv``: with its ``KVCache``, row 0 the last logits of a prefill of ``prompt[:prefill]``, row k
  the logits after feeding ``prompt[prefill + k - 1]`` alone;
- ``chunks`` (when the case lists ``chunks``): the logits of the prompt fed to one ``KVCache`` in
  chunks of those lengths, concatenated;
- ``greedy_tokens`` / ``greedy_masks``: ``Engine.generate(greedy_prompt, max_tokens=greedy_tokens,
  temperature=0.0)``, and ``greedy_margins``: at each sampled step, the gap between the two largest
  full-forward logits of the prompt plus the tokens so far (how far the step is from a tie).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path


def main(job: Path, out: Path) -> None:
    import numpy as np
    import torch
    from nanochat.checkpoint_manager import build_model
    from nanochat.engine import Engine, KVCache

    torch.manual_seed(0)
    device = torch.device("cpu")

    def make_cache(config, seq_len: int):
        kw = dict(
            batch_size=1,
            num_heads=config.n_kv_head,
            seq_len=seq_len,
            head_dim=config.n_embd // config.n_head,
            num_layers=config.n_layer,
        )
        if "device" in inspect.signature(KVCache).parameters:  # g4+: a preallocated cache
            kw.update(device=device, dtype=torch.float32)
        return KVCache(**kw)

    def run(model, ids: list[int], cache=None):
        return model(torch.tensor([ids], dtype=torch.long), kv_cache=cache)[0].float().numpy()

    out.mkdir(parents=True, exist_ok=True)
    for case in json.loads(job.read_text()):
        os.environ["NANOCHAT_BASE_DIR"] = case["folder"]  # get_tokenizer reads $NANOCHAT_BASE_DIR/tokenizer
        model, tokenizer, _ = build_model(case["folder"], case["step"], device, "eval")
        config, prompt, prefill = model.config, case["prompt"], case["prefill"]
        result = {}
        with torch.inference_mode():
            result["full"] = run(model, prompt)
            cache = make_cache(config, len(prompt))
            rows = [run(model, prompt[:prefill], cache)[-1]]
            rows += [run(model, [tok], cache)[-1] for tok in prompt[prefill:]]
            result["kv"] = np.stack(rows)
            if case.get("chunks"):
                cache, done, pieces = make_cache(config, len(prompt)), 0, []
                for n in case["chunks"]:
                    pieces.append(run(model, prompt[done : done + n], cache))
                    done += n
                assert done == len(prompt)
                result["chunks"] = np.concatenate(pieces)
            greedy_prompt = case["greedy_prompt"]
            tokens, masks = [], []
            stream = Engine(model, tokenizer).generate(
                greedy_prompt, num_samples=1, max_tokens=case["greedy_tokens"], temperature=0.0
            )
            for column, mask in stream:
                tokens.append(column[0])
                masks.append(mask[0])
            full = run(model, greedy_prompt + tokens)
            top2 = np.sort(full[len(greedy_prompt) - 1 : len(greedy_prompt) - 1 + len(tokens)], axis=-1)[:, -2:]
            result["greedy_tokens"] = np.array(tokens, dtype=np.int64)
            result["greedy_masks"] = np.array(masks, dtype=np.int64)
            result["greedy_margins"] = top2[:, 1] - top2[:, 0]
        np.savez(out / f"{case['name']}.npz", **result)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
