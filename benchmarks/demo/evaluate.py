"""The demo model's quality figures: ``python -m benchmarks.demo.evaluate --source demo --data DIR``.

- bits per byte on held-out text (``val_text.jsonl``: The Tempest and the Sonnets, never trained on),
  as the reference's ``evaluate_bpb`` (rows of ``sequence_len`` tokens, special tokens left out);
- arithmetic: each held-out question of ``eval_arithmetic.jsonl`` answered greedily through the
  engine; correct when the calculator ran the question's own expression (so its output is the true
  result) and the final text states that result. Reported overall and per operation;
- spelling: "Spell {word}." for a fixed sample of the words the chat data drills
  (``spelling_words.json``), greedy; correct when the reply is exactly "w is spelled w-o-r-d.".
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

from nanochat_mlx.loading import LoadedModel, load_model
from nanochat_mlx.options import LoadOptions
from nanochat_mlx.sampling import SamplingParams
from nanochat_mlx.training.checkpoints import token_bytes
from nanochat_mlx.training.data import eval_rows, read_dataset
from nanochat_mlx.training.distributed import World
from nanochat_mlx.training.evaluate import evaluate

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


def text_bpb(loaded: LoadedModel, path: Path) -> float:
    """Bits per byte of the held-out text file."""
    capacity = loaded.checkpoint.config.sequence_len + 1
    tokenizer = loaded.tokenizer
    rows = eval_rows(read_dataset(path, tokenizer, capacity), capacity, tokenizer.get_bos_token_id())
    _, bpb = evaluate(loaded.model, rows, 16, token_bytes(tokenizer), World())
    return bpb


def answer(loaded: LoadedModel, question: str) -> dict[str, str]:
    """The greedy reply's parts: the tool call, its output and the final text."""
    prompt = loaded.tokenizer.render_for_completion(
        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]}
    )
    parts: dict[str, str] = defaultdict(str)
    for event in loaded.engine.generate(prompt, GREEDY):
        for piece in event.pieces:
            if piece.kind != "special":
                parts[piece.kind] += piece.text
    return parts


def arithmetic_accuracy(loaded: LoadedModel, path: Path, limit: int | None = None) -> dict:
    """Accuracy on the held-out questions, overall and per operation, and a few failures."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    right, total, failures = defaultdict(int), defaultdict(int), []
    for row in rows:
        question = row["messages"][0]["content"]
        expr, result = (p["text"] for p in row["messages"][1]["content"][:2])
        op = next(c for c in "+-*/" if c in expr[1:])
        parts = answer(loaded, question)
        ok = parts["python"].strip() == expr and parts["python_output"] == result and result in parts["text"]
        right[op] += ok
        total[op] += 1
        if not ok and len(failures) < 5:
            failures.append({"question": question, "reply": dict(parts)})
    return {
        "questions": sum(total.values()),
        "accuracy": sum(right.values()) / max(sum(total.values()), 1),
        "by_operation": {op: right[op] / total[op] for op in sorted(total)},
        "failures": failures,
    }


def spelling_accuracy(loaded: LoadedModel, path: Path, n: int = 200) -> dict:
    """Accuracy spelling ``n`` of the drilled words (a fixed sample), and a few failures."""
    words = json.loads(path.read_text(encoding="utf-8"))
    sample = random.Random(0).sample(words, min(n, len(words)))
    right, failures = 0, []
    for word in sample:
        text = answer(loaded, f"Spell {word}.")["text"].strip()
        ok = text == f"{word} is spelled {'-'.join(word)}."
        right += ok
        if not ok and len(failures) < 5:
            failures.append({"word": word, "reply": text})
    return {"words": len(sample), "of": len(words), "accuracy": right / max(len(sample), 1), "failures": failures}


def evaluate_model(source: str, data: Path, limit: int | None = None) -> dict:
    loaded = load_model(LoadOptions(source, dtype="float32"))
    return {
        "val_bpb": round(text_bpb(loaded, data / "val_text.jsonl"), 4),
        "arithmetic": arithmetic_accuracy(loaded, data / "eval_arithmetic.jsonl", limit),
        "spelling": spelling_accuracy(loaded, data / "spelling_words.json"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--source", default="demo")
    p.add_argument("--data", required=True, type=Path, help="the data folder the build wrote (DIR/data)")
    p.add_argument("--limit", type=int, help="only the first N arithmetic questions")
    args = p.parse_args(argv)
    print(json.dumps(evaluate_model(args.source, args.data, args.limit), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
