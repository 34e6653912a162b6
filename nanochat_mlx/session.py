"""ChatSession: a multi-turn conversation over the engine that keeps its KV cache across turns.

Each turn's tokens are kept exactly as they were fed or sampled (tool calls and forced outputs
included), so the next turn's prompt starts with what the cache already holds and only the new
tokens are prefilled. Undo, regenerate and system-prompt changes trim the cache back to the
common prefix where the cache allows it, and rebuild it otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, GenerationEvent, GenerationStats
from .errors import NanochatError
from .sampling import SamplingParams


@dataclass
class Turn:
    """One user message and the assistant's reply to it."""

    user: str
    reply: str = ""
    reply_tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # cancelled before the model finished
    stats: GenerationStats | None = None

    def to_dict(self) -> dict:
        return {"user": self.user, "reply": self.reply, "reply_tokens": self.reply_tokens, "stopped": self.stopped}

    @classmethod
    def from_dict(cls, data: dict) -> Turn:
        return cls(data["user"], data.get("reply", ""), list(data.get("reply_tokens", [])), data.get("stopped", False))


class ChatSession:
    """A conversation with the model: ``send`` streams the reply to a new user message."""

    def __init__(self, engine: Engine, system_prompt: str | None = None, params: SamplingParams | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.system_prompt = system_prompt or None
        self.params = params or SamplingParams()
        self.turns: list[Turn] = []
        self.notices: list[str] = []  # things the front end should tell the user (dropped turns)
        self._cache: Any = None
        self._cached: list[int] = []  # the tokens the cache holds, in order

    # --- conversation edits --------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.turns = []

    def undo(self) -> Turn | None:
        """Remove the last turn and return it."""
        return self.turns.pop() if self.turns else None

    def load_turns(self, turns: list[Turn]) -> None:
        """Replace the conversation (e.g. a saved chat); the prompt cache keeps what still matches."""
        self.turns = list(turns)

    def set_system(self, text: str | None) -> None:
        self.system_prompt = text or None

    @property
    def last_stats(self) -> GenerationStats | None:
        return self.turns[-1].stats if self.turns else None

    # --- tokens --------------------------------------------------------------------------------
    def prompt_tokens(self, turns: list[Turn] | None = None) -> list[int]:
        """The reference's chat rendering: bos, then user/assistant turns, then assistant_start."""
        tok = self.tokenizer
        sp = tok.encode_special
        turns = self.turns if turns is None else turns
        ids = [tok.get_bos_token_id()]
        for i, turn in enumerate(turns):
            user = turn.user
            if i == 0 and self.system_prompt:  # merged into the first user message, as the reference
                user = self.system_prompt + "\n\n" + user
            ids += [sp("<|user_start|>"), *tok.encode(user), sp("<|user_end|>"), sp("<|assistant_start|>")]
            if i < len(turns) - 1:
                reply = turn.reply_tokens
                ids += reply if reply and reply[-1] == sp("<|assistant_end|>") else [*reply, sp("<|assistant_end|>")]
        return ids

    def context_used(self) -> int:
        """Tokens the conversation occupies so far (prompt and the last reply)."""
        if not self.turns:
            return 1
        return len(self.prompt_tokens()) + len(self.turns[-1].reply_tokens)

    # --- generation ----------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply's text."""
        for event in self.stream(text):
            if event.stats is None or event.text:
                yield event.text

    def stream(self, text: str) -> Iterator[GenerationEvent]:
        """Add a user message and stream the engine's events for the reply."""
        self.turns.append(Turn(text))
        return self._reply()

    def regenerate(self) -> Iterator[GenerationEvent]:
        """Replace the last reply with a new one (a new seed is the caller's choice)."""
        if not self.turns:
            raise NanochatError("nothing to regenerate yet")
        last = self.turns[-1]
        last.reply, last.reply_tokens, last.stopped, last.stats = "", [], False, None
        return self._reply()

    def _fit_context(self) -> list[int]:
        """Drop the oldest turns until prompt + reply fit the model's context."""
        limit = self.engine.context_limit
        want = self.params.max_tokens or 0
        tokens = self.prompt_tokens()
        while len(tokens) + min(want, limit // 2) > limit and len(self.turns) > 1:
            self.turns.pop(0)
            self.notices.append("the conversation outgrew the model's context: dropped the oldest turn")
            tokens = self.prompt_tokens()
        if len(tokens) >= limit:
            self.turns.pop()
            raise NanochatError(f"message too long: {len(tokens)} tokens, the model's context is {limit}")
        return tokens

    def _reuse_cache(self, tokens: list[int]) -> Any:
        """The session's cache, holding the longest prefix of ``tokens`` it can."""
        runner = self.engine.runner
        common = 0
        for a, b in zip(self._cached, tokens, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # at least one token must be run for fresh logits
        if self._cache is not None and common < len(self._cached):
            if common == 0 or not runner.trim(self._cache, len(self._cached) - common):
                self._cache, self._cached = None, []
            else:
                self._cached = self._cached[:common]
        if self._cache is None:
            self._cache, self._cached = runner.make_cache(), []
        return self._cache

    def _reply(self) -> Iterator[GenerationEvent]:
        tokens = self._fit_context()
        cache = self._reuse_cache(tokens)
        turn = self.turns[-1]
        fed = list(tokens)
        finished = False
        events = self.engine.generate(tokens, self.params, cache=cache)
        try:
            for event in events:
                if event.stats is None:
                    turn.reply_tokens.append(event.token)
                    fed.append(event.token)
                else:
                    turn.stats = event.stats
                    finished = True
                turn.reply += event.text
                yield event
        finally:
            events.close()  # a cancelled reply stops decoding now; the engine records its stats
            turn.stopped = not finished
            if not finished:
                turn.stats = self.engine.last_stats
            self._cached = fed[: self.engine.runner.cache_length(cache)]
