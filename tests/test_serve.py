"""``nanochat-mlx serve`` through the official ``openai`` client: OpenAI's shapes, batching, errors.

Each server is the real command, started as a subprocess on a free localhost port on the tiny g1
fixture (both backends for the key behaviours).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import expected_json, variant_dir
from servers import get, serve

from nanochat_mlx.tokenizer import Tokenizer

BACKENDS = ["mlx", "torch"]
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module", params=BACKENDS)
def server(request):
    with serve("--max-concurrency", "8", "--strict-model", backend=request.param) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="ignored", max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pickle(variant_dir("g1") / "tokenizer" / "tokenizer.pkl")


def chat(client, model_id, text: str, **kw):
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": text}], **kw)


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --- models, chat, streaming ------------------------------------------------------------------


def test_models_lists_the_loaded_model_by_its_source(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [str(variant_dir("g1"))]
    assert server.health()["status"] == "ok"


def test_streamed_deltas_concatenate_to_the_non_streamed_reply(client, model_id):
    whole = chat(client, model_id, "Why is the sky blue?", **GREEDY)
    chunks = list(chat(client, model_id, "Why is the sky blue?", stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.object == "chat.completion" and whole.usage.completion_tokens == GREEDY["max_tokens"]


def test_stream_ends_with_a_usage_chunk_when_asked(client, model_id):
    chunks = list(chat(client, model_id, "Hello", stream=True, stream_options={"include_usage": True}, **GREEDY))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == GREEDY["max_tokens"]
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_gives_several_choices_from_one_prompt(client, model_id):
    reply = chat(client, model_id, "Tell me a story", n=2, temperature=1.0, max_tokens=16, seed=7)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    solo = chat(client, model_id, "Tell me a story", max_tokens=16, temperature=1.0, seed=7)
    assert reply.usage.prompt_tokens == solo.usage.prompt_tokens  # one prompt, prefilled once
    assert reply.usage.completion_tokens == 32


def test_same_seed_gives_the_same_sampled_reply(client, model_id):
    a = chat(client, model_id, "Hi", temperature=1.0, max_tokens=16, seed=3).choices[0].message.content
    b = chat(client, model_id, "Hi", temperature=1.0, max_tokens=16, seed=3).choices[0].message.content
    assert a == b


def test_stop_string_split_across_tokens_ends_the_reply_and_is_not_emitted(client, model_id, tokenizer):
    case = expected_json("g1", "generate.json")["cases"][1]
    pieces = [tokenizer.decode([t]) for t in case["tokens_row0"]]
    # A stop string made of the end of one token's text and the start of the next one's.
    k = next(i for i in range(3, len(pieces) - 1) if pieces[i].isprintable() and pieces[i + 1].isprintable()
             and pieces[i].strip() and pieces[i + 1].strip())  # fmt: skip
    stop = pieces[k][-1] + pieces[k + 1][0]
    full = "".join(pieces)
    reply = client.completions.create(model=model_id, prompt=case["prompt_ids"], stop=[stop], **GREEDY)
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model_id, prompt=case["prompt_ids"], stop=stop, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


# --- raw completions ------------------------------------------------------------------------


def test_token_id_prompts_give_the_reference_greedy_tokens(client, model_id):
    for case in expected_json("g1", "generate.json")["cases"]:
        reply = client.completions.create(
            model=model_id,
            prompt=case["prompt_ids"],
            n=case["num_samples"],
            temperature=0,
            max_tokens=case["max_tokens"],
            extra_body={"top_k": 0, "return_token_ids": True},
        )
        for row, choice in enumerate(reply.choices):
            assert choice.token_ids == [column[row] for column in case["token_columns"]], case["name"]


def test_string_prompt_gets_bos_prepended(client, model_id, tokenizer):
    reply = client.completions.create(model=model_id, prompt="The", extra_body={"return_token_ids": True}, **GREEDY)
    ids = [tokenizer.get_bos_token_id(), *tokenizer.encode("The")]
    same = client.completions.create(model=model_id, prompt=ids, extra_body={"return_token_ids": True}, **GREEDY)
    assert reply.choices[0].token_ids == same.choices[0].token_ids
    assert reply.usage.prompt_tokens == len(ids)


# --- /tokenize and /detokenize ---------------------------------------------------------------


def test_tokenize_counts_prompts_and_conversations_as_the_completions_do(client, model_id, server):
    code, counted = post(server.url + "/tokenize", {"prompt": "The robot", "return_token_strs": True})
    reply = client.completions.create(model=model_id, prompt="The robot", max_tokens=1)
    assert code == 200 and counted["count"] == reply.usage.prompt_tokens == len(counted["tokens"])
    assert counted["token_strs"][0] == "<|bos|>" and counted["max_model_len"] > counted["count"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    code, counted = post(server.url + "/tokenize", {"messages": messages})
    reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=1)
    assert code == 200 and counted["count"] == reply.usage.prompt_tokens


def test_tokenize_reads_special_token_strings_as_those_tokens(server, tokenizer):
    """As vLLM's /tokenize does: lm-evaluation-harness finds bos_token's id this way."""
    code, info = get(server.url + "/tokenizer_info")
    assert code == 200 and info["bos_token"] == "<|bos|>" and info["model_max_length"] > 0
    _, counted = post(server.url + "/tokenize", {"prompt": info["bos_token"] + "hi", "add_special_tokens": False})
    assert counted["tokens"] == [tokenizer.get_bos_token_id(), *tokenizer.encode("hi")]
    assert post(server.url + "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})[1]["count"] == 1


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}, {"role": "user", "content": "d"}],
    ],
)
def test_the_chat_template_renders_as_the_server_does(server, messages):
    """/tokenizer_info's template, rendered by a client and tokenized by /tokenize, is the server's prompt."""
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(get(server.url + "/tokenizer_info")[1]["chat_template"])
    text = template.render(messages=messages, add_generation_prompt=True)
    client_side = post(server.url + "/tokenize", {"prompt": text, "add_special_tokens": False})[1]["tokens"]
    assert client_side == post(server.url + "/tokenize", {"messages": messages})[1]["tokens"]


def test_detokenize_reverses_tokenize(server):
    _, counted = post(server.url + "/tokenize", {"prompt": "café ☕ 東京", "add_special_tokens": False})
    code, text = post(server.url + "/detokenize", {"tokens": counted["tokens"]})
    assert code == 200 and text == {"prompt": "café ☕ 東京"}


@pytest.mark.parametrize(
    "path, body",
    [("tokenize", {}), ("tokenize", {"prompt": 7}), ("detokenize", {"tokens": [1, 10**6]}), ("detokenize", {})],
)
def test_bad_tokenize_requests_are_400(server, path, body):
    assert post(f"{server.url}/{path}", body)[0] == 400


# --- batching, prompt cache, disconnects ---------------------------------------------------


def test_eight_concurrent_greedy_requests_each_equal_its_solo_output(client, model_id, server):
    prompts = [f"Question {i}: " + "what is " * i + "the answer?" for i in range(8)]

    def run(prompt: str) -> list[int]:
        body = {"return_token_ids": True, "top_k": 0}
        reply = client.completions.create(model=model_id, prompt=prompt, extra_body=body, temperature=0, max_tokens=40)
        return reply.choices[0].token_ids

    solo = [run(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, prompts))
    assert together == solo
    assert server.health()["peak_running"] >= 4  # they did share decode steps


def test_the_next_turn_reuses_the_cached_conversation(client, model_id):
    messages = [{"role": "user", "content": "Remember the number 7 for me please."}]
    first = client.chat.completions.create(model=model_id, messages=messages, **GREEDY)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Which number?"},
    ]
    second = client.chat.completions.create(model=model_id, messages=messages, **GREEDY)
    # At least the first turn's prompt is reused (its reply too, where it re-tokenizes the same).
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_a_client_that_disconnects_mid_stream_frees_its_row(client, model_id, server):
    before = server.health()["cancelled"]
    stream = client.completions.create(model=model_id, prompt="Once", stream=True, temperature=0, max_tokens=600)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = server.health()
        if health["running"] == 0 and health["cancelled"] == before + 1:
            break
        time.sleep(0.05)
    assert (health["running"], health["cancelled"]) == (0, before + 1)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        (b"[" * 100_000, 400),  # json's decoder recurses per level: no 500
        (b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
        ({"messages": "hi"}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "top_k": 201}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4097}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"42": 100}}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "model": {"id": "m"}}, 400),
        ({"messages": [{"content": "hi"}]}, 400),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404),
        ({"messages": [{"role": "user", "content": "x" * 8001}]}, 413),
        (
            {
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 250
                + [{"role": "user", "content": "z"}]
            },
            413,
        ),  # fmt: skip
        (
            {
                "messages": [{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "y" * 8000}] * 2
                + [{"role": "user", "content": "z"}]
            },
            413,
        ),  # fmt: skip
    ],
)
def test_bad_requests_get_openai_errors_with_the_right_status(server, body, status):
    code, reply = post(server.url + "/v1/chat/completions", body)
    assert code == status
    assert isinstance(reply["error"]["message"], str) and reply["error"]["type"]


def test_a_prompt_beyond_the_context_is_refused(server):
    code, reply = post(server.url + "/v1/completions", {"prompt": list(range(1, 400)) * 2})
    assert code == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert reply["error"]["param"] == "prompt" and reply["error"]["message"].startswith("the prompt is 798 tokens")


def test_a_conversation_beyond_the_context_is_counted_whole(server):
    """/tokenize and the context error give the conversation's real length, not one cut at the limit."""
    messages = [{"role": "user", "content": "x " * 3000}]
    code, counted = post(server.url + "/tokenize", {"messages": messages})
    assert code == 200 and counted["count"] > counted["max_model_len"] + 1000
    code, reply = post(server.url + "/v1/chat/completions", {"messages": messages})
    assert code == 400 and reply["error"]["message"].startswith(f"the prompt is {counted['count']} tokens")
    assert reply["error"]["param"] == "messages"


def test_a_lone_surrogate_escape_is_read_as_the_replacement_character(server):
    """JSON may spell a UTF-16 half that no UTF-8 can hold; it comes back echoed as U+FFFD."""
    body = b'{"prompt": "a\\ud800b", "max_tokens": 1, "echo": true, "logprobs": 1}'
    code, reply = post(server.url + "/v1/completions", body)
    assert code == 200 and reply["choices"][0]["text"].startswith("a\ufffdb")


def test_vllm_and_llama_cpp_spellings_of_off_and_random_are_accepted(client, model_id):
    reply = chat(client, model_id, "hi", max_tokens=2, seed=-1, extra_body={"top_k": -1})
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_an_assistant_message_with_null_content_is_an_empty_turn(server):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "?"},
    ]
    code, reply = post(server.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert code == 200, reply


def test_a_non_streaming_client_that_disconnects_frees_its_row():
    """Its row must not run on to max_tokens: a few such clients would hold every batch slot."""
    with serve(source="demo", backend="torch") as s:  # 2500 tokens take seconds here
        body = {"prompt": "Once", "max_tokens": 2500, "ignore_eos": True}
        request = urllib.request.Request(s.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(TimeoutError):
            urllib.request.urlopen(request, timeout=1)  # the client gives up, its socket closes
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            health = s.health()
            if health["running"] == 0 and health["cancelled"] == 1:
                break
            time.sleep(0.05)
        assert (health["running"], health["cancelled"]) == (0, 1)


def test_unknown_model_is_404_for_the_client(client):
    with pytest.raises(openai.NotFoundError):
        chat(client, "gpt-4o", "hi", max_tokens=2)


def test_the_model_can_be_retrieved_by_its_id(client, model_id):
    assert client.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_queue_full_is_429():
    with serve("--max-concurrency", "1", "--queue", "1", backend="mlx") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        long = {"stream": True, "max_tokens": 600, "extra_body": {"ignore_eos": True}}  # no early stop
        running = client.completions.create(model=model, prompt="a", **long)
        next(iter(running))  # the only row is taken
        waiting = client.completions.create(model=model, prompt="b", **long)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=model, prompt="c", max_tokens=4)
        running.close()
        waiting.close()


def test_a_source_that_cannot_load_ends_the_command_with_one_line(tmp_path):
    with serve(source=str(tmp_path / "missing"), wait=False) as s:
        assert s.process.wait(timeout=60) == 1
        lines = s.process.stderr.read().decode().strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in "".join(lines)


@pytest.mark.parametrize("flag", ["--max-concurrency", "--queue", "--prefill-chunk"])
def test_a_batching_bound_under_one_ends_the_command_with_one_line(flag):
    with serve(flag, "0", wait=False) as s:
        assert s.process.wait(timeout=60) == 1
        lines = s.process.stderr.read().decode().strip().splitlines()
    assert lines == ["error: --max-concurrency, --queue and --prefill-chunk must be at least 1"]


def test_ctrl_c_stops_the_server_promptly_even_mid_stream():
    """uvicorn alone would wait, silently, for every open stream to end."""
    with serve(source="demo", backend="torch") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="ignored", max_retries=0)
        stream = client.completions.create(model="m", prompt="Once", stream=True, max_tokens=2500,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        next(iter(stream))  # the reply is under way (about 6 s of tokens on this CPU)
        began = time.monotonic()
        s.process.send_signal(signal.SIGINT)
        assert s.process.wait(timeout=15) == 130  # as a shell reports Ctrl-C
        assert time.monotonic() - began < 6
        stderr = s.process.stderr.read().decode()
    assert "stopping; replies in flight get 2 s" in stderr and "Traceback" not in stderr, stderr


def test_replies_cut_by_ctrl_c_end_with_abort_and_their_token_count():
    with serve(source="demo", backend="torch") as s:
        body = {"prompt": "Once", "max_tokens": 2500, "ignore_eos": True}
        with ThreadPoolExecutor(1) as pool:
            cut = pool.submit(post, s.url + "/v1/completions", body)
            deadline = time.monotonic() + 30
            while s.health()["running"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # some tokens out
            s.process.send_signal(signal.SIGINT)
            code, reply = cut.result(timeout=15)
        assert s.process.wait(timeout=15) == 130
    assert code == 200 and reply["choices"][0]["finish_reason"] == "abort"
    assert reply["usage"]["completion_tokens"] > 0 and reply["choices"][0]["text"]


def test_health_is_503_while_the_model_loads():
    with serve(backend="torch", wait=False) as s:
        s.wait_ready()
        assert s.first_health == 503


# --- auth and CORS --------------------------------------------------------------------------


def test_api_key_is_enforced_when_set():
    with serve("--api-key", "sesame", backend="mlx") as s:
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert get(s.url + "/v1/models")[0] == 401
        right = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert right.models.list().data
        assert get(s.url + "/health")[0] == 200  # health needs no key


def test_cors_preflight_is_answered_for_allowed_origins_only():
    with serve("--allowed-origins", "http://localhost:3000", backend="mlx") as s:

        def preflight(origin: str):
            request = urllib.request.Request(
                s.url + "/v1/chat/completions",
                method="OPTIONS",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    # what the OpenAI SDKs send besides the key and the body's type
                    "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,openai-organization",
                },  # fmt: skip
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    return r.status, r.headers.get("access-control-allow-origin")
            except urllib.error.HTTPError as e:
                return e.code, e.headers.get("access-control-allow-origin")

        assert preflight("http://localhost:3000") == (200, "http://localhost:3000")
        assert preflight("http://evil.example")[0] == 400


def test_concurrent_streams_from_threads_all_finish(client, model_id):
    results: list[str] = []

    def run(i: int) -> None:
        chunks = chat(client, model_id, f"Count to {i}", stream=True, temperature=0.7, max_tokens=12, seed=i)
        results.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(results)


def test_ignore_eos_decodes_max_tokens_past_the_terminal_token():
    with serve(backend="mlx") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        # The fixture's greedy completion of "a" is a terminal token at once.
        plain = client.completions.create(model=model, prompt="a", max_tokens=200, temperature=0)
        assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 200
        full = client.completions.create(
            model=model, prompt="a", max_tokens=200, temperature=0, extra_body={"ignore_eos": True}
        )
        assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 200


def test_a_calculator_reply_also_comes_as_prose_without_the_markup():
    with serve("--source", "demo", backend="mlx") as s:  # a later --source wins
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "What is 123*45?"}]
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40)
        message = reply.choices[0].message.model_dump()
        assert message["nanochat_tool_calls"] == [{"expression": "123*45", "output": "5535"}]
        assert "5535" in message["nanochat_text"] and "python" not in message["nanochat_text"]
        streamed = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=40, stream=True
        )
        prose = "".join(
            (c.choices[0].delta.model_extra or {}).get("nanochat_text", c.choices[0].delta.content or "")
            for c in streamed
            if c.choices
        )
        assert prose == message["nanochat_text"]


def test_without_strict_model_any_model_name_gets_the_loaded_model():
    with serve(backend="mlx") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(model="gpt-4o", messages=messages, temperature=0, max_tokens=4)
        assert reply.choices[0].message.content is not None and reply.model == client.models.list().data[0].id
