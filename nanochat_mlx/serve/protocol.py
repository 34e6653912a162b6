"""OpenAI's request fields and errors: parse and check a request body into what the scheduler runs.

Every check gives OpenAI's error JSON with the right status: wrong types and out-of-range values
400, oversized conversations 413. The limits default to those of nanochat's own chat server
(scripts/chat_web.py): at most 500 messages, 8000 characters a message, 32000 in all,
temperature 0-2, top-k 0-200, 1-4096 new tokens.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from ..errors import NanochatError
from ..sampling import MAX_TOP_LOGPROBS, SamplingParams

# The reference chat server's sampling defaults.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 50
DEFAULT_MAX_TOKENS = 512
MAX_STOPS = 4  # as OpenAI
MAX_SEED = 2**62  # choice i of n samples with seed + i: every backend's generator takes it
MAX_PROMPTS = 64  # prompts one /v1/completions request may batch (each is queued as its own job)


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_tokens: int = 4096
    max_temperature: float = 2.0
    max_top_k: int = 200
    max_body_bytes: int = 4 << 20


@dataclass
class Generation:
    """What a request asks the scheduler for (tokens are filled in by the route)."""

    params: SamplingParams
    n: int
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens whatever the model's terminal tokens
    logprobs: int | None = None  # each token's log-probability, with this many alternatives
    echo: bool = False  # /v1/completions: the prompt comes back before the reply (scored with logprobs)

    @property
    def score_prompt(self) -> bool:
        return self.echo and self.logprobs is not None


_MISSING = object()


def field(body: dict, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    """``body[name]`` if it has one of ``kinds`` (null counts as absent), else a 400 naming the field."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    # bool is an int in Python, never in JSON's sense.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {type(value).__name__}: {value!r}"[:300], param=name)
    return value


def ranged(body: dict, name: str, kinds, lo, hi, default, what: str):
    value = field(body, name, kinds, what, default)
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def generation(body: dict, limits: Limits, max_rows: int, chat: bool = True) -> Generation:
    """The sampling options, n, stop strings and streaming flags of a (chat) completion request."""
    number = (int, float)
    temperature = ranged(body, "temperature", number, 0.0, limits.max_temperature, DEFAULT_TEMPERATURE, "a number")
    top_p = ranged(body, "top_p", number, 0.0, 1.0, 1.0, "a number")
    if top_p == 0:
        raise ApiError(400, "'top_p' must be greater than 0", param="top_p")
    top_k = ranged(body, "top_k", (int,), -1, limits.max_top_k, DEFAULT_TOP_K, "an integer")  # 0, -1: off
    min_p = ranged(body, "min_p", number, 0.0, 0.999999, 0.0, "a number")
    penalty = ranged(body, "repetition_penalty", number, 0.01, 10.0, 1.0, "a number")
    for name in ("frequency_penalty", "presence_penalty"):
        if field(body, name, number, "a number", 0) != 0:
            raise ApiError(
                400,
                f"'{name}' is not supported (nanochat's engine has a multiplicative 'repetition_penalty', "
                "as mlx-lm and llama.cpp call it; use that)",
                param=name,
            )
    if field(body, "tools", (list,), "a list"):
        raise ApiError(400, "'tools' is not supported: the model's calculator tool runs on the server", param="tools")
    unsupported(body)
    echo = False if chat else field(body, "echo", (bool,), "a boolean", False)
    fewest = 0 if echo else 1  # an echoed prompt may be only scored
    max_tokens = ranged(body, "max_completion_tokens", (int,), fewest, limits.max_tokens, None, "an integer")
    if max_tokens is None:
        max_tokens = ranged(body, "max_tokens", (int,), fewest, limits.max_tokens, DEFAULT_MAX_TOKENS, "an integer")
    n = ranged(body, "n", (int,), 1, max_rows, 1, "an integer")
    seed = ranged(body, "seed", (int,), -1, MAX_SEED, None, "an integer")  # -1: a fresh draw, as llama.cpp
    stop = field(body, "stop", (str, list), "a string or a list of strings", [])
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be up to {MAX_STOPS} non-empty strings", param="stop")
    stream = field(body, "stream", (bool,), "a boolean", False)
    options = field(body, "stream_options", (dict,), "an object", {})
    include_usage = field(options, "include_usage", (bool,), "a boolean", False)
    ignore_eos = field(body, "ignore_eos", (bool,), "a boolean", False)
    logprobs = (
        requested_logprobs(body) if chat else ranged(body, "logprobs", (int,), 0, MAX_TOP_LOGPROBS, None, "an integer")
    )
    try:
        params = SamplingParams(
            temperature=float(temperature),
            top_k=top_k if top_k > 0 else None,
            top_p=float(top_p),
            min_p=float(min_p),
            repetition_penalty=float(penalty),
            # Without a seed, every request draws anew (OpenAI's behaviour); with one, it repeats.
            seed=seed if seed is not None and seed >= 0 else random.randrange(MAX_SEED),
            max_tokens=max_tokens,
        )
    except NanochatError as e:
        raise ApiError(400, str(e)) from None
    return Generation(params, n, tuple(stops), stream, include_usage, ignore_eos, logprobs, echo)


def unsupported(body: dict) -> None:
    """Fields that would change the output if honoured are refused, not silently ignored."""
    response_format = field(body, "response_format", (dict,), "an object", {})
    if response_format.get("type", "text") != "text":
        raise ApiError(400, f"'response_format' {response_format.get('type')!r} is not supported (only 'text')"[:300],
                       param="response_format")  # fmt: skip
    if field(body, "logit_bias", (dict,), "an object"):
        raise ApiError(400, "'logit_bias' is not supported", param="logit_bias")


def requested_logprobs(body: dict) -> int | None:
    """Chat's ``logprobs`` (a boolean) and ``top_logprobs`` (the alternatives) as one count, or None."""
    wanted = field(body, "logprobs", (bool,), "a boolean", False)
    top = ranged(body, "top_logprobs", (int,), 0, MAX_TOP_LOGPROBS, None, "an integer")
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def chat_messages(body: dict, limits: Limits) -> list[dict]:
    """The conversation as the tokenizer renders it: system (and developer) messages merged into
    the first user message, as the reference does; assistant replies as text."""
    messages = field(body, "messages", (list,), "a list of messages")
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise ApiError(413, f"too many messages: at most {limits.max_messages}", param="messages", code="too_large")
    out, system, total = [], [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = field(message, "role", (str,), "a string")
        if role is None:
            raise ApiError(400, f"messages[{i}] has no 'role'", param=f"messages[{i}].role")
        content = message.get("content")
        if content is None and role == "assistant":  # OpenAI's clients send null beside tool calls
            content = ""
        text = message_text(content, f"messages[{i}].content")
        if len(text) > limits.max_message_chars:
            raise ApiError(
                413, f"messages[{i}] is too long: at most {limits.max_message_chars} characters", code="too_large"
            )
        total += len(text)
        if role in ("system", "developer"):
            if out:
                raise ApiError(400, f"messages[{i}]: a system message must come before the conversation")
            system.append(text)
        elif role in ("user", "assistant"):
            out.append({"role": role, "content": text})
        else:
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}"[:300],
                           param=f"messages[{i}].role")  # fmt: skip
    if total > limits.max_total_chars:
        too_long = f"the conversation is too long: at most {limits.max_total_chars} characters"
        raise ApiError(413, too_long, code="too_large")
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    roles = [m["role"] for m in out if m["role"] != "system"]
    if not roles or roles[-1] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    if any(r == roles[i - 1] for i, r in enumerate(roles) if i):
        raise ApiError(400, "user and assistant messages must alternate", param="messages")
    return out


def message_text(content: Any, name: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{name}: only text parts are supported", param=name)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{name} must be a string or a list of text parts", param=name)


def completion_prompts(body: dict, limits: Limits) -> list[str | list[int]]:
    """/v1/completions' prompts: a string or a list of token ids (used exactly as given), or a list
    of either (up to MAX_PROMPTS, answered as ``n`` choices each, in order)."""
    prompt = body.get("prompt")
    batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list) else [prompt]
    if len(batch) > MAX_PROMPTS:
        raise ApiError(413, f"too many prompts: at most {MAX_PROMPTS}", param="prompt", code="too_large")
    if sum(len(p) for p in batch if isinstance(p, str)) > limits.max_total_chars:
        too_long = f"the prompt is too long: at most {limits.max_total_chars} characters"
        raise ApiError(413, too_long, param="prompt", code="too_large")
    for p in batch:
        ids = isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        if not (isinstance(p, str) or ids):
            raise ApiError(
                400, "'prompt' must be a string, a non-empty list of token ids, or a list of those", param="prompt"
            )
    return batch


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how one gets into JSON (raw, it is invalid UTF-8)


def parse_body(body: bytes) -> dict:
    """A request body: a JSON object, its strings valid Unicode (``without_surrogates``)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return without_surrogates(data) if _SURROGATE_ESCAPE.search(body) else data


def without_surrogates(data: Any) -> Any:
    """``data`` (parsed JSON) with every lone UTF-16 surrogate in its strings made U+FFFD.

    JSON's ``\\ud800`` escapes parse into strings that cannot be encoded as UTF-8, so they could
    neither be tokenized nor sent back (an echoed prompt); browsers and tokenizers replace them
    the same way. The walk is iterative: the document may be as deep as the parser allowed.
    """

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return _SURROGATE.sub("\ufffd", value)
        if isinstance(value, dict):
            cleaned = {clean(k): v for k, v in value.items()}
            stack.append(cleaned)
            return cleaned
        if isinstance(value, list):
            stack.append(value)
        return value

    stack: list = []
    root = clean(data)
    while stack:
        node = stack.pop()
        keys = node.keys() if isinstance(node, dict) else range(len(node))
        for key in list(keys):
            node[key] = clean(node[key])
    return root
