"""Log-probabilities, echo and batched prompts from ``nanochat-mlx serve``, against the reference.

The real server (a subprocess on the g1 fixture, both backends, prompts read in chunks of 16
tokens) through the official ``openai`` client. Each token's log-probability is the log-softmax of
the model's raw logits, so a one-token completion of a prefix of a fixture prompt, and an echoed
(scored) prompt, must list the reference's own full-forward log-softmax.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from conftest import expected_json, expected_npz, variant_dir
from servers import serve
from test_serve import post

from nanochat_mlx.tokenizer import Tokenizer

BACKENDS = ["mlx", "torch"]
GREEDY = {"temperature": 0, "extra_body": {"top_k": 0}}


@pytest.fixture(scope="module", params=BACKENDS)
def server(request):
    with serve("--max-concurrency", "8", "--prefill-chunk", "16", backend=request.param) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="ignored", max_retries=0)


def reference_log_softmax(prompt: str) -> np.ndarray:
    logits = expected_npz("g1", "logits_full.npz")[prompt].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def prompt_ids(name: str) -> list[int]:
    return next(p["ids"] for p in expected_json("g1", "prompts.json")["prompts"] if p["name"] == name)


@pytest.mark.parametrize("position", [0, 7, 28, 40])
def test_a_tokens_logprobs_are_the_reference_log_softmax(client, position):
    ids, expected = prompt_ids("p3_long"), reference_log_softmax("p3_long")[position]
    reply = client.completions.create(model="m", prompt=ids[: position + 1], max_tokens=1, logprobs=5, **GREEDY)
    logprobs = reply.choices[0].logprobs
    best = expected[np.argsort(-expected, kind="stable")[:5]]
    # The legacy top_logprobs is keyed by text: byte-fragment tokens ("\ufffd") share one key.
    top = logprobs.top_logprobs[0].values()
    assert top and all(np.abs(best - value).min() < 1e-4 for value in top)
    assert logprobs.token_logprobs[0] == pytest.approx(best[0], abs=1e-4)  # greedy: the likeliest


def test_chat_lists_every_output_token_with_its_bytes_and_alternatives(client):
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi there"}], max_tokens=12, logprobs=True, top_logprobs=3,
        **GREEDY,
    )  # fmt: skip
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens - (choice.finish_reason == "stop")  # no terminal token
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == choice.message.content
    for token in content:
        tops = [t.logprob for t in token.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-5
        assert (token.token, token.logprob) == (token.top_logprobs[0].token, tops[0])


def test_logprobs_without_alternatives_list_only_the_chosen_tokens(client):
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, **GREEDY
    )
    assert all(t.top_logprobs == [] and t.logprob <= 0 for t in reply.choices[0].logprobs.content)
    plain = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_non_streamed_ones(client):
    ask = dict(model="m", messages=[{"role": "user", "content": "Tell me"}], max_tokens=10, logprobs=True,
               top_logprobs=2, **GREEDY)  # fmt: skip
    whole = client.chat.completions.create(**ask).choices[0].logprobs.content
    chunks = client.chat.completions.create(**ask, stream=True)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole]
    # The second request's prompt comes from the prompt cache: float32 rounding may differ.
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-5)


def test_completion_text_offsets_follow_the_tokens(client):
    reply = client.completions.create(model="m", prompt="The robot", max_tokens=8, logprobs=1, **GREEDY)
    logprobs = reply.choices[0].logprobs
    lengths = [len(t) for t in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
    streamed = client.completions.create(model="m", prompt="The robot", max_tokens=8, logprobs=1, stream=True, **GREEDY)
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == logprobs.text_offset


def test_a_batched_requests_logprobs_equal_its_solo_ones(client, server):
    prompts = [prompt_ids("p3_long")[: 5 + 6 * i] for i in range(6)]

    def run(prompt: list[int]):
        reply = client.completions.create(model="m", prompt=prompt, max_tokens=12, logprobs=2, **GREEDY)
        return reply.choices[0].logprobs

    solo = [run(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(run, prompts))
    for alone, batched in zip(solo, together, strict=True):
        assert batched.tokens == alone.tokens
        assert batched.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)
    assert server.health()["peak_running"] >= 2  # they did share decode steps


# --- echo: a prompt's own log-probabilities ---------------------------------------------------


def test_an_echoed_prompt_is_scored_as_the_reference_scores_it(client):
    ids, expected = prompt_ids("p3_long"), reference_log_softmax("p3_long")
    reply = client.completions.create(model="m", prompt=ids, max_tokens=0, echo=True, logprobs=1, **GREEDY)
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts it
    want = [expected[i - 1, ids[i]] for i in range(1, len(ids))]
    assert logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert reply.choices[0].text == Tokenizer.from_pickle(variant_dir("g1") / "tokenizer" / "tokenizer.pkl").decode(ids)
    assert len(logprobs.tokens) == len(ids)
    assert reply.usage.completion_tokens == 0


def test_lm_eval_harness_loglikelihood_request(client):
    """What lm-evaluation-harness's ``local-completions`` sends to score a continuation."""
    ids, expected = prompt_ids("p1_short"), reference_log_softmax("p1_short")
    context = 12
    reply = client.completions.create(model="m", prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1  # the prompt, then one generated token
    continuation = sum(logprobs.token_logprobs[context:-1])
    assert continuation == pytest.approx(sum(expected[i - 1, ids[i]] for i in range(context, len(ids))), abs=1e-3)


def test_echo_without_logprobs_puts_the_prompt_before_the_reply(client):
    plain = client.completions.create(model="m", prompt="The robot", max_tokens=6, **GREEDY)
    echoed = client.completions.create(model="m", prompt="The robot", max_tokens=6, echo=True, **GREEDY)
    assert echoed.choices[0].text == "The robot" + plain.choices[0].text


def test_a_streamed_echo_comes_first(client):
    ask = dict(model="m", prompt="The robot", max_tokens=5, echo=True, logprobs=1, **GREEDY)
    whole = client.completions.create(**ask).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**ask, stream=True) if c.choices]
    assert chunks[0].text == "The robot"
    assert "".join(c.text for c in chunks) == whole.text
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert tokens == whole.logprobs.tokens


# --- several prompts in one request ------------------------------------------------------------


def test_a_list_of_prompts_gives_their_choices_in_order(client):
    prompts = ["The robot", "Once upon", "A ship"]
    alone = [client.completions.create(model="m", prompt=p, max_tokens=8, **GREEDY).choices[0].text for p in prompts]
    reply = client.completions.create(model="m", prompt=prompts, max_tokens=8, n=2, **GREEDY)
    assert [c.index for c in reply.choices] == list(range(6))
    assert [c.text for c in reply.choices] == [t for t in alone for _ in range(2)]  # prompt p's choice i: p*n + i


def test_streamed_prompts_concatenate_per_choice(client):
    prompts = [prompt_ids("p1_short")[:9], prompt_ids("p3_long")[:14]]
    whole = client.completions.create(model="m", prompt=prompts, max_tokens=10, **GREEDY)
    texts = ["", ""]
    for c in client.completions.create(model="m", prompt=prompts, max_tokens=10, stream=True, **GREEDY):
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]


@pytest.mark.parametrize(
    "path, body",
    [
        ("chat/completions", {"top_logprobs": 2}),  # without logprobs: true
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}),
        ("chat/completions", {"logprobs": 1}),  # chat's logprobs is a boolean
        ("completions", {"logprobs": 21}),
        ("completions", {"logprobs": True}),  # the legacy logprobs is a count
    ],
)
def test_bad_logprobs_requests_are_400(server, path, body):
    base = {"messages": [{"role": "user", "content": "hi"}]} if path.startswith("chat") else {"prompt": "hi"}
    code, reply = post(f"{server.url}/v1/{path}", base | body)
    assert code == 400 and "logprobs" in reply["error"]["message"], reply


@pytest.mark.parametrize(
    "body, status",
    [
        ({"prompt": "hi", "max_tokens": 0}, 400),  # nothing to do without echo
        ({"prompt": ["hi", 7]}, 400),
        ({"prompt": [[1, 2], []]}, 400),
        ({"prompt": [[1, 2], [1, 10**6]]}, 400),  # a token id outside the vocabulary
        ({"prompt": ["hi"] * 65}, 413),
        ({"prompt": "hi", "echo": "yes"}, 400),
    ],
)
def test_bad_prompt_batches_get_openai_errors(server, body, status):
    code, reply = post(f"{server.url}/v1/completions", body)
    assert code == status, reply
