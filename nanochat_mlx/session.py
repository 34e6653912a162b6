"""ChatSession: a multi-turn conversation over the engine that keeps its KV cache across turns.

Each turn's reply is kept twice: as the reference's message parts (``text``, ``python``,
``python_output``), so the conversation is one that ``render_conversation`` accepts as is, and as
the exact tokens fed or sampled, so the next turn's prompt starts with what the cache already
holds and only the new tokens are prefilled. The transcript keeps every turn; when it outgrows
the model's context only what is fed to the model starts later (``context_start``). Undo,
regenerate and system-prompt changes trim the cache back to the common prefix where the cache
allows it, and rebuild it otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .engine import Engine, GenerationEvent, GenerationStats, Piece
from .errors import NanochatError
from .sampling import SamplingParams

PART_KINDS = ("text", "python", "python_output")


@dataclass
class Turn:
    """One user message and the assistant's reply to it."""

    user: str
    parts: list[dict] = field(default_factory=list)  # the reply as the reference's message parts
    reply_tokens: list[int] = field(default_factory=list)  # exactly as fed to the model
    stopped: bool = False  # cancelled before the model finished
    stats: GenerationStats | None = None

    @property
    def reply(self) -> str:
        """The reply's prose and tool parts as plain text (no special-token markers)."""
        return "".join(part["text"] for part in self.parts)

    def add(self, piece: Piece) -> None:
        """Extend the reply with a streamed piece: markers carry no part text; an empty python or
        output piece opens a new part (a tool call being typed)."""
        if piece.kind not in PART_KINDS:
            return
        opens = not piece.text and piece.kind != "text"
        if self.parts and self.parts[-1]["type"] == piece.kind and not opens:
            self.parts[-1]["text"] += piece.text
        elif piece.text or opens:
            self.parts.append({"type": piece.kind, "text": piece.text})

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.user}, {"role": "assistant", "content": self.parts}]

    def to_dict(self) -> dict:
        return {
            "user": self.user,
            "parts": self.parts,
            "reply_tokens": self.reply_tokens,
            "stopped": self.stopped,
            "stats": asdict(self.stats) if self.stats is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Turn:
        """A turn saved by ``to_dict``; raises ValueError/TypeError/KeyError on anything else."""
        user = data["user"]
        parts = data.get("parts", [])
        if not isinstance(user, str) or not isinstance(parts, list):
            raise ValueError("a turn needs a text 'user' and a list of 'parts'")
        for part in parts:
            if (
                not isinstance(part, dict)
                or part.get("type") not in PART_KINDS
                or not isinstance(part.get("text"), str)
            ):
                raise ValueError(f"a reply part must be {{'type': one of {PART_KINDS}, 'text': str}}")
        tokens = data.get("reply_tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError("'reply_tokens' must be a list of token ids")
        stats = data.get("stats")
        return cls(
            user,
            [dict(p) for p in parts],
            list(tokens),
            bool(data.get("stopped", False)),
            GenerationStats(**stats) if isinstance(stats, dict) else None,
        )


class ChatSession:
    """A conversation with the model: ``send`` streams the reply to a new user message."""

    def __init__(self, engine: Engine, system_prompt: str | None = None, params: SamplingParams | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.system_prompt = system_prompt or None
        self.params = params or SamplingParams()
        self.turns: list[Turn] = []
        self.context_start = 0  # the first turn the model still sees
        self._cache: Any = None
        self._cached: list[int] = []  # the tokens the cache holds, in order

    # --- conversation edits --------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.turns, self.context_start = [], 0

    def undo(self) -> Turn | None:
        """Remove the last turn and return it."""
        turn = self.turns.pop() if self.turns else None
        self.context_start = min(self.context_start, max(len(self.turns) - 1, 0))
        return turn

    def load_turns(self, turns: list[Turn]) -> None:
        """Replace the conversation (e.g. a saved chat); the prompt cache keeps what still matches."""
        self.turns, self.context_start = list(turns), 0

    def set_system(self, text: str | None) -> None:
        self.system_prompt = text or None

    def conversation(self) -> dict:
        """The transcript as the reference's conversation dict (system message first, if any)."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for turn in self.turns:
            messages += turn.messages()
        return {"messages": messages}

    def retokenize(self, turn: Turn) -> None:
        """Token ids for a turn's reply from its parts (a chat saved with another model)."""
        ids, _ = self.tokenizer.render_conversation({"messages": turn.messages()}, max_tokens=1 << 30)
        turn.reply_tokens = ids[ids.index(self.tokenizer.encode_special("<|assistant_start|>")) + 1 :]

    @property
    def last_stats(self) -> GenerationStats | None:
        return self.turns[-1].stats if self.turns else None

    # --- tokens --------------------------------------------------------------------------------
    def prompt_tokens(self, start: int | None = None) -> list[int]:
        """The reference's chat rendering of the turns from ``start`` (default: what the model sees):
        bos, then user/assistant turns, then assistant_start."""
        tok = self.tokenizer
        sp = tok.encode_special
        turns = self.turns[self.context_start if start is None else start :]
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
        """Tokens the model's view of the conversation occupies (prompt and the last reply)."""
        if not self.turns:
            return 1
        return len(self.prompt_tokens()) + len(self.turns[-1].reply_tokens)

    # --- generation ----------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply's text (as the CLI prints it)."""
        for event in self.stream(text):
            if event.text:
                yield event.text

    def stream(self, text: str) -> Iterator[GenerationEvent]:
        """Add a user message and stream the engine's events for the reply.

        The message is refused (NanochatError, nothing added) when it alone can't fit the context.
        """
        if not text.strip():
            raise NanochatError("the message is empty")
        self.turns.append(Turn(text))
        try:
            notices = self._fit_context()
        except NanochatError:
            self.turns.pop()
            raise
        return self._reply(notices)

    def regenerate(self) -> Iterator[GenerationEvent]:
        """Replace the last reply with a new one (a new seed is the caller's choice)."""
        if not self.turns:
            raise NanochatError("nothing to regenerate yet")
        last = self.turns[-1]
        last.parts, last.reply_tokens, last.stopped, last.stats = [], [], False, None
        return self._reply(self._fit_context())

    def _fit_context(self) -> list[str]:
        """Move the model's view past the oldest turns until prompt + reply fit its context."""
        limit = self.engine.context_limit
        room = min(self.params.max_tokens or 0, limit // 2)
        notices = []
        start = min(self.context_start, len(self.turns) - 1)
        while len(self.prompt_tokens(start)) + room > limit and start < len(self.turns) - 1:
            start += 1
        if start > self.context_start:
            hidden = "the first turn (it stays" if start == 1 else f"the first {start} turns (they stay"
            notices.append(
                f"the conversation outgrew the model's context ({limit} tokens): it no longer sees "
                f"{hidden} in the transcript)"
            )
        tokens = len(self.prompt_tokens(start))
        if tokens >= limit:
            raise NanochatError(f"message too long: {tokens} tokens, the model's context is {limit}")
        self.context_start = start
        return notices

    def _reuse_cache(self, tokens: list[int]) -> Any:
        """The session's cache, holding the longest prefix of ``tokens`` it can."""
        engine = self.engine
        common = 0
        for a, b in zip(self._cached, tokens, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # at least one token must be run for fresh logits
        if self._cache is not None and common < len(self._cached):
            if common == 0 or not engine.trim_cache(self._cache, len(self._cached) - common):
                self._cache, self._cached = None, []
            else:
                self._cached = self._cached[:common]
        if self._cache is None:
            self._cache, self._cached = engine.make_cache(), []
        return self._cache

    def _reply(self, notices: list[str]) -> Iterator[GenerationEvent]:
        tokens = self.prompt_tokens()
        cache = self._reuse_cache(tokens)
        turn = self.turns[-1]
        fed = list(tokens)
        finished = False
        events = self.engine.generate(tokens, self.params, cache=cache)
        try:
            for event in events:
                if notices:
                    event.notices, notices = notices, []
                turn.reply_tokens += event.tokens
                fed += event.tokens
                for piece in event.pieces:
                    turn.add(piece)
                turn.stats = event.stats
                finished = event.final
                yield event
        finally:
            events.close()  # a cancelled reply stops decoding now; the engine records its stats
            turn.stopped = not finished
            if not finished and self.engine.last_stats is not None:
                turn.stats = self.engine.last_stats
            self._cached = fed[: self.engine.cache_length(cache)]
