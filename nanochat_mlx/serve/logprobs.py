"""OpenAI's ``logprobs`` objects, from the scheduler's per-token entries: chat's and the legacy
completions' (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), and ``echo``."""

from __future__ import annotations

import itertools

from .scheduler import TokenLogprob


class Echo:
    """``echo``: each choice's prompt as given (a string without the ``<|bos|>`` put before it) and,
    once scored, its tokens' log-probabilities (a list of ids: the first has none)."""

    def __init__(self, tokenizer, prompts: list[str | list[int]], n: int, scored: list[list[TokenLogprob]]) -> None:
        self.tokenizer, self.prompts, self.n = tokenizer, prompts, n
        self.scored = scored  # per prompt, filled in as the prompts are scored

    def text(self, choice: int) -> str:
        prompt = self.prompts[choice // self.n]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def logprobs(self, choice: int) -> dict:
        p = choice // self.n
        scored = self.scored[p]
        return completion_logprobs(self.tokenizer, scored[1:] if isinstance(self.prompts[p], str) else scored)


def joined(first: dict, then: dict) -> dict:
    """Two legacy ``logprobs`` objects, one after the other."""
    return {key: first[key] + then[key] for key in first}


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """Chat's ``logprobs`` object: each output token, its bytes and its likeliest alternatives."""

    def token(t: int, logprob: float) -> dict:
        return {"token": tokenizer.decode([t]), "logprob": logprob, "bytes": list(tokenizer.decode_bytes([t]))}

    content = [token(e.token, e.logprob) | {"top_logprobs": [token(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries: list[TokenLogprob], offset: int = 0) -> dict:
    """The legacy completions' ``logprobs`` object; ``text_offset`` counts from ``offset`` in the text."""
    tokens = [tokenizer.decode([e.token]) for e in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.top is None else {tokenizer.decode([t]): lp for t, lp in e.top} for e in entries],
        "text_offset": list(itertools.accumulate((len(t) for t in tokens), initial=offset))[:-1],
    }
