"""vLLM's request extensions that ecosystem tools send, through the served app."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.serve.conftest import ServedApp
from tests.serve.test_bad_requests import post_and_expect_error

CHAT = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(tiny_app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_app.v1, api_key="unused", timeout=60, max_retries=0)


def test_continuous_usage_stats_put_the_usage_so_far_in_every_completion_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(
        model="tiny", prompt="The sea", max_tokens=6, stream=True, temperature=0.0,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True},
    ))  # fmt: skip
    assert all(chunk.usage is not None for chunk in chunks)
    counts = [chunk.usage.completion_tokens for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1].choices == []  # the include_usage chunk still comes last
    assert all(chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
               for chunk in chunks)  # fmt: skip


def test_continuous_usage_stats_in_chat_chunks_from_the_role_chunk_on(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, stream=True, temperature=0.0,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True},
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].usage.completion_tokens == 0
    assert all(chunk.usage is not None for chunk in chunks)
    assert chunks[-1].usage.completion_tokens == 4


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(tiny_app: ServedApp) -> None:
    body = {"prompt": "Hello", "max_tokens": 4, "logprobs": 2, "return_tokens_as_token_ids": True, **GREEDY}
    logprobs = httpx.post(f"{tiny_app.v1}/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 4
    assert all(re.fullmatch(r"token_id:\d+", token) for token in logprobs["tokens"])
    assert all(re.fullmatch(r"token_id:\d+", token) for top in logprobs["top_logprobs"] for token in top)
    chat = {"messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 1, "return_tokens_as_token_ids": True,
            **GREEDY}  # fmt: skip
    content = httpx.post(f"{tiny_app.v1}/chat/completions", json=chat, timeout=60).json()["choices"][0]["logprobs"]
    assert all(re.fullmatch(r"token_id:\d+", entry["token"]) for entry in content["content"])


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny_app: ServedApp) -> None:
    prompt = [510, 3485, 314, 253, 1345, 282, 260, 3101]
    truncated = httpx.post(f"{tiny_app.v1}/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 5, "truncate_prompt_tokens": 3, **GREEDY}).json()  # fmt: skip
    tail_only = httpx.post(f"{tiny_app.v1}/completions", timeout=60, json={
        "prompt": prompt[-3:], "max_tokens": 5, **GREEDY}).json()  # fmt: skip
    assert truncated["usage"]["prompt_tokens"] == 3
    assert truncated["choices"][0]["text"] == tail_only["choices"][0]["text"]
    chat = httpx.post(f"{tiny_app.v1}/chat/completions", timeout=60, json={
        "messages": CHAT, "max_tokens": 2, "truncate_prompt_tokens": 2, **GREEDY}).json()  # fmt: skip
    assert chat["usage"]["prompt_tokens"] == 2


def test_truncate_prompt_tokens_over_the_context_is_refused(tiny_app: ServedApp) -> None:
    body = {"prompt": "Hi", "truncate_prompt_tokens": 10**6}
    post_and_expect_error(tiny_app, "/v1/completions", body, None, 400, "truncate_prompt_tokens", "max_model_len")


def test_skip_special_tokens_false_keeps_special_tokens_in_the_text(tiny_app: ServedApp) -> None:
    # logit_bias forces <|im_start|> (id 1, special, not EOS) at every step.
    body = {"prompt": "Hi", "max_tokens": 2, "logit_bias": {"1": 100}, **GREEDY}
    skipped = httpx.post(f"{tiny_app.v1}/completions", json=body, timeout=60).json()["choices"][0]["text"]
    kept = httpx.post(f"{tiny_app.v1}/completions", json={**body, "skip_special_tokens": False,
                                                          "spaces_between_special_tokens": False},
                      timeout=60).json()["choices"][0]["text"]  # fmt: skip
    assert skipped == "" and kept == "<|im_start|><|im_start|>"


def test_add_special_tokens_is_accepted_on_both_endpoints(tiny_app: ServedApp) -> None:
    # SmolLM2's tokenizer adds no special tokens to plain text: the unit tests show the effect on one that does.
    for path, body in (("/v1/completions", {"prompt": "Hi", "add_special_tokens": False}),
                       ("/v1/chat/completions", {"messages": CHAT, "add_special_tokens": True})):  # fmt: skip
        response = httpx.post(tiny_app.base_url + path, json={**body, "max_tokens": 2}, timeout=60)
        assert response.status_code == 200, response.text


def test_x_request_id_is_the_response_id_and_echoed(tiny_app: ServedApp) -> None:
    headers = {"X-Request-Id": "trace-42"}
    for _ in range(2):  # the same id twice: the engine's ids stay unique
        response = httpx.post(f"{tiny_app.v1}/completions", json={"prompt": "Hi", "max_tokens": 2},
                              headers=headers, timeout=60)  # fmt: skip
        assert response.json()["id"] == "cmpl-trace-42"
        assert response.headers["X-Request-Id"] == "trace-42"
    with httpx.stream("POST", f"{tiny_app.v1}/chat/completions", headers=headers, timeout=60,
                      json={"messages": CHAT, "max_tokens": 2, "stream": True}) as stream:  # fmt: skip
        assert stream.headers["X-Request-Id"] == "trace-42"
        ids = {line for line in stream.iter_lines() if line.startswith("data: {")}
    assert ids and all('"id":"chatcmpl-trace-42"' in line for line in ids)
    refused = httpx.post(f"{tiny_app.v1}/completions", json={"prompt": []}, headers=headers, timeout=60)
    assert refused.status_code == 400 and refused.headers["X-Request-Id"] == "trace-42"


def test_request_id_body_field_names_the_response_over_the_header(tiny_app: ServedApp) -> None:
    body = {"messages": CHAT, "max_tokens": 2, "request_id": "mine-1"}
    response = httpx.post(f"{tiny_app.v1}/chat/completions", json=body, headers={"X-Request-Id": "other"}, timeout=60)
    assert response.json()["id"] == "chatcmpl-mine-1"


def test_without_a_request_id_the_response_id_matches_the_echoed_header(tiny_app: ServedApp) -> None:
    response = httpx.post(f"{tiny_app.v1}/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert response.json()["id"] == f"cmpl-{response.headers['X-Request-Id']}"


def test_tokenize_a_prompt_and_detokenize_it_back(tiny_app: ServedApp) -> None:
    tokenized = httpx.post(f"{tiny_app.base_url}/tokenize", timeout=60,
                           json={"model": "tiny", "prompt": "The capital of France", "return_token_strs": True}).json()
    models = httpx.get(f"{tiny_app.v1}/models", timeout=60).json()
    assert tokenized["count"] == len(tokenized["tokens"]) > 0
    assert tokenized["max_model_len"] == models["data"][0]["max_model_len"]
    assert "".join(tokenized["token_strs"]) == "The capital of France"
    completion = httpx.post(f"{tiny_app.v1}/completions", json={"prompt": "The capital of France", "max_tokens": 1},
                            timeout=60).json()  # fmt: skip
    assert completion["usage"]["prompt_tokens"] == tokenized["count"]
    detokenized = httpx.post(f"{tiny_app.base_url}/detokenize", json={"model": "tiny", "tokens": tokenized["tokens"]},
                             timeout=60).json()  # fmt: skip
    assert detokenized == {"prompt": "The capital of France"}


def test_tokenize_messages_counts_what_chat_sends(tiny_app: ServedApp) -> None:
    tokenized = httpx.post(f"{tiny_app.base_url}/tokenize", json={"messages": CHAT}, timeout=60).json()
    chat = httpx.post(f"{tiny_app.v1}/chat/completions", json={"messages": CHAT, "max_tokens": 1}, timeout=60).json()
    assert tokenized["count"] == chat["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("path", "body", "param", "message"), [
    ("/tokenize", {"prompt": "Hi", "messages": CHAT}, "prompt", "exactly one"),
    ("/tokenize", {"prompt": "Hi", "promt": "x"}, "promt", "unrecognized"),
    ("/detokenize", {"tokens": [10**9]}, "tokens", "vocabulary"),
    ("/detokenize", {"tokens": "Hi"}, "tokens", ""),
])  # fmt: skip
def test_bad_tokenize_requests_are_refused(tiny_app: ServedApp, path: str, body: dict, param: str, message: str) -> None:
    post_and_expect_error(tiny_app, path, body, None, 400, param, message)
