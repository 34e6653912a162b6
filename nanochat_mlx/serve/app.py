"""The HTTP side: OpenAI-compatible routes on Starlette, the web chat page, auth and CORS.

Routes only parse, check and shape; generation happens on the scheduler's model thread, whose
events reach a request through an asyncio queue. A streaming client that disconnects cancels its
job, which leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .logprobs import Echo, chat_logprobs, completion_logprobs, joined
from .protocol import (
    ApiError,
    Generation,
    Limits,
    chat_messages,
    completion_prompts,
    field,
    generation,
    parse_body,
)
from .scheduler import Delta, Failed, Finished, Job, QueueFull, Scheduler, Scored, Started, TokenLogprob

WEB = Path(__file__).resolve().parent / "web"


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    limits: Limits = Limits()
    strict_model: bool = False  # 404 for a request naming another model (else any name is served)


DISCONNECT_CHECK_S = 0.5  # how often a request looks whether its client is still there
SHUTDOWN_GRACE_S = 2  # after Ctrl-C, replies in flight get this long to finish before they are cut


class Server(uvicorn.Server):
    """uvicorn's server, stopping as a chat server should on Ctrl-C (or SIGTERM).

    uvicorn waits, silently, for every open response to end. Here the first signal says what
    happens, and replies still running ``SHUTDOWN_GRACE_S`` later are cancelled: their streams
    end (``data: [DONE]``), so the connections close before uvicorn's own deadline would cut them.
    """

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler) -> None:
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit and self.started:
            print(f"nanochat-mlx serve: stopping; replies in flight get {SHUTDOWN_GRACE_S} s "
                  "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)  # fmt: skip
            threading.Timer(SHUTDOWN_GRACE_S, self.scheduler.cancel_all).start()
        super().handle_exit(sig, frame)


# The reference's chat rendering (Tokenizer.render_for_completion) as a Jinja chat template, for
# clients that render conversations themselves and tokenize through /tokenize: a system message is
# merged into the first user message, and the reply is primed with <|assistant_start|>.
CHAT_TEMPLATE = (
    "<|bos|>{% set ns = namespace(system=none) %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% elif m['role'] == 'user' %}<|user_start|>"
    "{% if ns.system is not none %}{{ ns.system }}\n\n{% set ns.system = none %}{% endif %}"
    "{{ m['content'] }}<|user_end|>"
    "{% else %}<|assistant_start|>{{ m['content'] }}<|assistant_end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant_start|>{% endif %}"
)


class Reply:
    """What the scheduler sent back for a request's jobs (``prompts`` of ``n`` choices), as it streams."""

    def __init__(self, n: int, prompts: int = 1) -> None:
        self.n = n
        n *= prompts
        self.prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in range(prompts)]
        self.texts = [""] * n
        self.prose = [""] * n  # the texts without the calculator's markup
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.tools: list[list[dict]] = [[] for _ in range(n)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def build_app(scheduler: Scheduler, config: ServerConfig) -> Starlette:
    limits = config.limits

    def engine_or_503():
        if not scheduler.ready.is_set():
            raise ApiError(503, "the model is still loading", "service_unavailable", code="model_loading")
        if scheduler.error:
            raise ApiError(503, f"the model failed to load: {scheduler.error}", "service_unavailable")
        return scheduler.engine

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return  # a Bearer token is accepted and ignored
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.api_key):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")  # fmt: skip

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="too_large")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="too_large")
        except ClientDisconnect:  # nobody reads the answer; the log stays quiet
            raise ApiError(400, "the client disconnected while sending the body") from None
        return parse_body(bytes(body))

    def check_model(body: dict) -> None:
        model = field(body, "model", (str,), "a string")
        if config.strict_model and model is not None:
            check_model_id(model)

    def check_model_id(name: str) -> None:
        if name != config.model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server runs {config.model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def check_context(tokens: list[int], engine, param: str) -> None:
        limit = engine.context_limit
        if len(tokens) >= limit:
            raise ApiError(400, f"the prompt is {len(tokens)} tokens; the model's context is {limit}",
                           param=param, code="context_length_exceeded")  # fmt: skip

    async def submit(prompts: list[list[int]], gen: Generation) -> tuple[list[Job], asyncio.Queue]:
        """One job per prompt, their events on one queue as (prompt, event)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = []
        for p, tokens in enumerate(prompts):
            sink = lambda ev, p=p: loop.call_soon_threadsafe(queue.put_nowait, (p, ev))  # noqa: E731
            job = Job(tokens, gen.params, sink, gen.n, gen.stops, gen.ignore_eos, gen.logprobs, gen.score_prompt)
            try:
                scheduler.submit(job)
            except QueueFull as e:
                for queued in jobs:
                    queued.cancel()
                raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from None
            jobs.append(job)
        return jobs, queue

    async def events(jobs: list[Job], queue: asyncio.Queue, reply: Reply, request: Request) -> AsyncIterator:
        """The jobs' events until all are over, as (prompt, event) with choice indices counted across
        the prompts (prompt p's choice i is p*n + i); the jobs are cancelled if the consumer stops early."""
        running, checked = len(jobs), time.monotonic()
        try:
            while running:
                # A client that went away stops its rows within DISCONNECT_CHECK_S, streaming or not.
                if time.monotonic() - checked > DISCONNECT_CHECK_S:
                    if await request.is_disconnected():
                        return
                    checked = time.monotonic()
                try:
                    p, event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    continue
                if event is None:
                    running -= 1
                    continue
                if isinstance(event, Failed):
                    prefix = "" if event.status == 503 else "generation failed: "
                    raise ApiError(event.status, prefix + event.message, "server_error")
                if isinstance(event, Delta | Finished):
                    event = replace(event, index=p * reply.n + event.index)
                if isinstance(event, Started):
                    reply.prompt_tokens += event.prompt_tokens
                    reply.cached_tokens += event.cached_tokens
                elif isinstance(event, Scored):
                    reply.prompt_logprobs[p] = event.logprobs
                elif isinstance(event, Delta):
                    reply.texts[event.index] += event.text
                    reply.prose[event.index] += event.text if event.prose is None else event.prose
                    reply.tokens[event.index] += event.tokens
                    reply.logprobs[event.index] += event.logprobs or []
                    if event.tool:
                        reply.tools[event.index].append(event.tool)
                elif isinstance(event, Finished):
                    reply.finish[event.index] = event.reason
                    reply.completion_tokens += event.completion_tokens
                yield p, event
        finally:
            for job in jobs:
                job.cancel()  # a no-op once every row has finished

    # --- routes -------------------------------------------------------------------------------
    async def health(request: Request) -> Response:
        try:
            engine_or_503()
        except ApiError as e:
            return JSONResponse({"status": "loading" if e.code == "model_loading" else "error", **e.body()}, 503)
        return JSONResponse({"status": "ok", "model": config.model_id, **scheduler.load_stats()})

    async def models(request: Request) -> Response:
        authorize(request)
        engine_or_503()
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        """OpenAI's ``models.retrieve``: this server's one model."""
        authorize(request)
        engine_or_503()
        check_model_id(request.path_params["name"])
        return JSONResponse(model_card())

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": started, "owned_by": "nanochat-mlx"}

    async def start(request: Request, prompts: list[list[int]], gen: Generation, engine, kind: str):
        """Queue a generation: its reply (filled as events arrive), the response's id fields, its events."""
        for tokens in prompts:
            check_context(tokens, engine, "messages" if kind == "chatcmpl" else "prompt")
        jobs, queue = await submit(prompts, gen)
        reply = Reply(gen.n, len(prompts))
        meta = {"id": f"{kind}-{secrets.token_hex(12)}", "created": int(time.time()), "model": config.model_id}
        return reply, meta, events(jobs, queue, reply, request)

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        engine = engine_or_503()
        body = await read_json(request)
        check_model(body)
        messages = chat_messages(body, limits)
        gen = generation(body, limits, scheduler.max_rows)
        tokens = chat_tokens(engine.tokenizer, messages)
        reply, meta, stream = await start(request, [tokens], gen, engine, "chatcmpl")
        if gen.stream:
            return sse(chat_chunks(stream, reply, gen, meta, engine.tokenizer))
        async for _ in stream:
            pass
        choices = []
        for i in range(gen.n):
            message = {"role": "assistant", "content": reply.texts[i]}
            if reply.prose[i] != reply.texts[i]:
                message["nanochat_text"] = reply.prose[i]
            if reply.tools[i]:
                message["nanochat_tool_calls"] = reply.tools[i]
            logprobs = chat_logprobs(engine.tokenizer, reply.logprobs[i]) if gen.logprobs is not None else None
            choice = {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reply.finish[i]}
            choices.append(choice | token_ids(body, reply, i))
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": reply.usage()})

    async def chat_chunks(
        stream: AsyncIterator, reply: Reply, gen: Generation, meta: dict, tokenizer
    ) -> AsyncIterator[dict]:
        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**meta, "object": "chat.completion.chunk", "choices": [choice]} | usage_null

        usage_null = {"usage": None} if gen.include_usage else {}
        for i in range(gen.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for _, event in stream:
            if isinstance(event, Delta) and (event.text or event.tool or event.logprobs):
                delta = {"content": event.text}
                if event.prose is not None:
                    delta["nanochat_text"] = event.prose
                if event.tool:
                    delta["nanochat_tool_call"] = event.tool
                logprobs = chat_logprobs(tokenizer, event.logprobs) if event.logprobs else None
                yield chunk(event.index, delta, logprobs=logprobs)
            elif isinstance(event, Finished):
                yield chunk(event.index, {}, event.reason)
        if gen.include_usage:
            yield {**meta, "object": "chat.completion.chunk", "choices": [], "usage": reply.usage()}

    async def completions(request: Request) -> Response:
        authorize(request)
        engine = engine_or_503()
        body = await read_json(request)
        check_model(body)
        prompts = completion_prompts(body, limits)
        if field_set(body, "suffix") or (body.get("best_of") or 1) != 1:
            raise ApiError(400, "'suffix' and 'best_of' are not supported")
        gen = generation(body, limits, scheduler.max_rows, chat=False)
        tok = engine.tokenizer
        reply, meta, stream = await start(request, [prompt_tokens(tok, p) for p in prompts], gen, engine, "cmpl")
        echo = Echo(tok, prompts, reply.n, reply.prompt_logprobs) if gen.echo else None
        if gen.stream:
            return sse(completion_chunks(stream, reply, gen, meta, tok, echo))
        async for _ in stream:
            pass
        choices = []
        for c, text in enumerate(reply.texts):
            logprobs = None
            if gen.logprobs is not None:
                logprobs = completion_logprobs(tok, reply.logprobs[c], len(echo.text(c)) if echo else 0)
            if echo:
                text = echo.text(c) + text
                logprobs = joined(echo.logprobs(c), logprobs) if logprobs is not None else None
            choice = {"index": c, "text": text, "logprobs": logprobs, "finish_reason": reply.finish[c]}
            choices.append(choice | token_ids(body, reply, c))
        return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": reply.usage()})

    async def completion_chunks(
        stream, reply: Reply, gen: Generation, meta: dict, tokenizer, echo: Echo | None
    ) -> AsyncIterator[dict]:
        def chunk(c: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> dict:
            choice = {"index": c, "text": text, "logprobs": logprobs, "finish_reason": finish}
            return {**meta, "object": "text_completion", "choices": [choice]} | usage_null

        usage_null = {"usage": None} if gen.include_usage else {}
        offsets = [0] * len(reply.texts)  # where each choice's next token text starts
        async for p, event in stream:
            # The echo opens each of the prompt's choices, once it is scored (or at once, unscored).
            if echo and isinstance(event, Scored if gen.score_prompt else Started):
                for c in range(p * reply.n, (p + 1) * reply.n):
                    offsets[c] = len(echo.text(c))
                    yield chunk(c, echo.text(c), echo.logprobs(c) if gen.score_prompt else None)
            elif isinstance(event, Delta) and (event.text or event.logprobs):
                logprobs = None
                if event.logprobs:
                    logprobs = completion_logprobs(tokenizer, event.logprobs, offsets[event.index])
                    offsets[event.index] += sum(len(t) for t in logprobs["tokens"])
                yield chunk(event.index, event.text, logprobs)
            elif isinstance(event, Finished):
                yield chunk(event.index, "", None, event.reason)
        if gen.include_usage:
            yield {**meta, "object": "text_completion", "choices": [], "usage": reply.usage()}

    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: a prompt's (or a conversation's) tokens. Special-token strings in a prompt
        are those tokens, as in vLLM (whose tokenizers read text so): lm-evaluation-harness finds
        ``bos_token``'s id this way. /v1/completions reads a string prompt as plain text."""
        authorize(request)
        engine = engine_or_503()
        body = await read_json(request)
        tok = engine.tokenizer
        if "messages" in body:
            tokens = chat_tokens(tok, chat_messages(body, limits))
        else:
            prompt = field(body, "prompt", (str,), "a string")
            if prompt is None:
                raise ApiError(400, "give 'prompt' (a string) or 'messages'", param="prompt")
            if len(prompt) > limits.max_total_chars:
                raise ApiError(413, f"the prompt is too long: at most {limits.max_total_chars} characters",
                               param="prompt", code="too_large")  # fmt: skip
            special = field(body, "add_special_tokens", (bool,), "a boolean", True)
            tokens = ([tok.get_bos_token_id()] if special else []) + tok.encode_with_specials(prompt)
        out = {"count": len(tokens), "max_model_len": engine.context_limit, "tokens": tokens}
        if field(body, "return_token_strs", (bool,), "a boolean", False):
            out["token_strs"] = [tok.decode([t]) for t in tokens]
        return JSONResponse(out)

    async def tokenizer_info(request: Request) -> Response:
        """vLLM's /tokenizer_info: what a client needs to tokenize as the server does (with /tokenize)."""
        authorize(request)
        engine = engine_or_503()
        tok = engine.tokenizer
        return JSONResponse({
            "tokenizer_class": "nanochat (tiktoken BPE)",
            "bos_token": "<|bos|>",  # every document and conversation starts with it
            "eos_token": "<|assistant_end|>",  # a reply ends with it (a base model's document with <|bos|>)
            "pad_token": None,
            "model_max_length": engine.context_limit,
            "vocab_size": tok.vocab_size,
            "special_tokens": sorted(tok.get_special_tokens(), key=tok.encode_special),
            "chat_template": CHAT_TEMPLATE,
        })  # fmt: skip

    async def detokenize(request: Request) -> Response:
        """vLLM's /detokenize: the text of a list of token ids (special tokens spelled out)."""
        authorize(request)
        engine = engine_or_503()
        body = await read_json(request)
        tokens = field(body, "tokens", (list,), "a list of token ids")
        if tokens is None or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(prompt_tokens(engine.tokenizer, tokens))})

    async def index(request: Request) -> Response:
        return FileResponse(WEB / "index.html")

    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), exc.status)

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        detail = getattr(exc, "detail", "not found")
        return JSONResponse(ApiError(status, f"{request.method} {request.url.path}: {detail}").body(), status)

    started = int(time.time())
    middleware = []
    if config.allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.allowed_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],  # the OpenAI SDKs send their own (x-stainless-*, openai-organization)
            )
        )
    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info),
        Mount("/static", StaticFiles(directory=WEB), name="static"),
    ]
    handlers = {ApiError: api_error, 404: not_found, 405: not_found}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


def prompt_tokens(tokenizer, prompt: str | list[int]) -> list[int]:
    """A completion prompt's tokens: a string's after ``<|bos|>``, a list of ids as given."""
    if isinstance(prompt, str):
        return [tokenizer.get_bos_token_id(), *tokenizer.encode(prompt)]
    if not all(0 <= t < tokenizer.vocab_size for t in prompt):
        raise ApiError(400, f"token ids must be in 0..{tokenizer.vocab_size - 1}", param="prompt")
    return list(prompt)


def token_ids(body: dict, reply: Reply, index: int) -> dict:
    """vLLM's ``return_token_ids`` extension: the choice's generated token ids."""
    return {"token_ids": reply.tokens[index]} if body.get("return_token_ids") is True else {}


def field_set(body: dict, name: str) -> bool:
    return body.get(name) not in (None, False, "")


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: ``data: {json}`` lines, then ``data: [DONE]``."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ApiError as e:  # after the headers went out: the error travels as an event
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(lines(), media_type="text/event-stream", headers=headers)


def chat_tokens(tokenizer, messages: list[dict]) -> list[int]:
    """The reference's chat rendering of ``messages`` primed for the assistant's reply, whole (the
    request limits bound its length; a prompt over the context is refused with its real length)."""
    try:
        return tokenizer.render_for_completion(
            {"messages": [*messages, {"role": "assistant", "content": ""}]}, max_tokens=sys.maxsize
        )
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
