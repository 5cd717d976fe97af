"""Hostile and malformed input, beyond test_bad_requests.py's table: every case gets a 4xx with an OpenAI error body
that names the problem, and the server answers normally afterwards. Together the two tables try 77 bad requests."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.serve.conftest import ServedApp
from tests.serve.test_bad_requests import BAD_REQUESTS, post_and_expect_error

CHAT = [{"role": "user", "content": "Hi"}]
JSON = {"content-type": "application/json"}
DEPTH = 100_000  # deeper than Python's recursion limit, far under the body cap

# (name, path, body: dict | bytes, headers, expected status, expected `param`, text the message must contain)
HOSTILE_REQUESTS = [
    # --- numbers out of range ---
    ("negative max_tokens", "/v1/completions", {"prompt": "Hi", "max_tokens": -1}, None, 400, "max_tokens", ""),
    ("huge max_tokens", "/v1/completions", {"prompt": "Hi", "max_tokens": 10**12}, None, 400, "max_tokens",
     "max_model_len"),
    ("fractional max_tokens", "/v1/completions", {"prompt": "Hi", "max_tokens": 3.5}, None, 400, "max_tokens", ""),
    ("max_tokens as text", "/v1/completions", {"prompt": "Hi", "max_tokens": "ten"}, None, 400, "max_tokens", ""),
    ("temperature too high", "/v1/completions", {"prompt": "Hi", "temperature": 1e6}, None, 400, "temperature", ""),
    ("temperature NaN", "/v1/completions", b'{"prompt": "Hi", "temperature": NaN}', JSON, 400, "temperature", ""),
    ("top_p above 1", "/v1/completions", {"prompt": "Hi", "top_p": 1.5}, None, 400, "top_p", ""),
    ("top_p Infinity", "/v1/completions", b'{"prompt": "Hi", "top_p": Infinity}', JSON, 400, "top_p", ""),
    ("top_k below -1", "/v1/completions", {"prompt": "Hi", "top_k": -5}, None, 400, "top_k", ""),
    ("min_p above 1", "/v1/completions", {"prompt": "Hi", "min_p": 2}, None, 400, "min_p", ""),
    ("presence_penalty out of range", "/v1/completions", {"prompt": "Hi", "presence_penalty": 5}, None, 400,
     "presence_penalty", ""),
    ("repetition_penalty zero", "/v1/completions", {"prompt": "Hi", "repetition_penalty": 0}, None, 400,
     "repetition_penalty", ""),
    ("seed too large", "/v1/completions", {"prompt": "Hi", "seed": 2**70}, None, 400, "seed", ""),
    ("n zero", "/v1/completions", {"prompt": "Hi", "n": 0}, None, 400, "n", ""),
    ("n huge", "/v1/chat/completions", {"messages": CHAT, "n": 10**9}, None, 400, "n", "at most"),
    ("best_of over the cap", "/v1/completions", {"prompt": "Hi", "best_of": 1000}, None, 400, "best_of", "at most"),
    ("logprobs out of range", "/v1/completions", {"prompt": "Hi", "logprobs": 1000}, None, 400, "logprobs", ""),
    ("negative logprobs", "/v1/completions", {"prompt": "Hi", "logprobs": -1}, None, 400, "logprobs", ""),
    ("top_logprobs out of range", "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 99},
     None, 400, "top_logprobs", ""),
    ("logit_bias NaN", "/v1/completions", b'{"prompt": "Hi", "logit_bias": {"5": NaN}}', JSON, 400, "logit_bias",
     ""),
    # --- prompts ---
    ("empty prompt string", "/v1/completions", {"prompt": ""}, None, 400, "prompt", "empty"),
    ("empty prompt in a list", "/v1/completions", {"prompt": ["Hi", ""]}, None, 400, "prompt", "empty"),
    ("empty token list in a batch", "/v1/completions", {"prompt": [[5, 6], []]}, None, 400, "prompt", "empty"),
    ("negative token id", "/v1/completions", {"prompt": [5, -1]}, None, 400, "prompt", "vocabulary"),
    ("token id past int64", "/v1/completions", {"prompt": [5, 2**70]}, None, 400, "prompt", "vocabulary"),
    ("prompt mixing text and ids", "/v1/completions", {"prompt": ["Hi", 5]}, None, 400, "prompt.1", ""),
    ("too many prompts", "/v1/completions", {"prompt": ["Hi"] * 65}, None, 400, "prompt", "at most 64"),
    ("chat over the context window", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hello " * 1100}]}, None, 400, "messages", "max_model_len"),
    # --- chat structure ---
    ("message content of a wrong type", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     None, 400, "messages.0.content", ""),
    ("message without a role", "/v1/chat/completions", {"messages": [{"content": "Hi"}]}, None, 400,
     "messages.0.role", "Field required"),
    ("unknown field in a message", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "Hi", "mood": "angry"}]}, None, 400, "messages.0.mood",
     "unrecognized"),
    ("content part of an unknown type", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, None, 400,
     "messages.0.content.0.type", ""),
    ("messages not a list", "/v1/chat/completions", {"messages": "Hi"}, None, 400, "messages", ""),
    # --- stop conditions ---
    ("too many stop strings (refused by the engine)", "/v1/completions",
     {"prompt": "Hi", "stop": [f"s{i}" for i in range(17)]}, None, 400, None, "17 stop strings"),
    ("empty stop string", "/v1/completions", {"prompt": "Hi", "stop": [""]}, None, 400, "stop", "empty"),
    ("stop_token_ids not a list", "/v1/completions", {"prompt": "Hi", "stop_token_ids": "x"}, None, 400,
     "stop_token_ids", ""),
    # --- types and unknowns ---
    ("model of a wrong type", "/v1/completions", {"prompt": "Hi", "model": 123}, None, 400, "model", ""),
    ("model name with a NUL byte", "/v1/completions", {"prompt": "Hi", "model": "tiny\u0000"}, None, 404, "model",
     "does not exist"),
    ("stream not a boolean", "/v1/completions", {"prompt": "Hi", "stream": [1]}, None, 400, "stream", ""),
    ("unknown field in stream_options", "/v1/chat/completions",
     {"messages": CHAT, "stream": True, "stream_options": {"include_usage": True, "x": 1}}, None, 400,
     "stream_options.x", "unrecognized"),
    ("/generate with negative max_tokens", "/generate", {"prompt": "Hi", "max_tokens": -5}, None, 400,
     "max_tokens", ""),
    ("/generate with a negative temperature", "/generate", {"prompt": "Hi", "temperature": -1}, None, 400,
     "temperature", ""),
    # --- bytes on the wire ---
    ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe\xfd"}', JSON, 400, None, "not valid JSON"),
    ("raw NUL byte in a string", "/v1/completions", b'{"prompt": "a\x00b"}', JSON, 400, None, "not valid JSON"),
    ("deeply nested JSON", "/v1/completions", b'{"prompt": ' + b"[" * DEPTH + b"]" * DEPTH + b"}", JSON, 400, None,
     "nested too deeply"),
    ("empty body", "/v1/completions", b"", JSON, 400, None, "JSON object"),
    ("JSON null", "/v1/chat/completions", b"null", JSON, 400, None, "JSON object"),
    ("text/plain content type", "/v1/completions", json.dumps({"prompt": "Hi"}).encode(),
     {"content-type": "text/plain"}, 415, None, "application/json"),
    ("form content type (curl -d without a header)", "/v1/chat/completions", b"messages=Hi",
     {"content-type": "application/x-www-form-urlencoded"}, 415, None, "application/json"),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "param", "message"),
                         [case[1:] for case in HOSTILE_REQUESTS],
                         ids=[case[0] for case in HOSTILE_REQUESTS])  # fmt: skip
def test_hostile_request_gets_an_openai_error(
    tiny_app: ServedApp, path: str, body: dict | bytes, headers: dict | None, status: int, param: str | None,
    message: str,
) -> None:  # fmt: skip
    post_and_expect_error(tiny_app, path, body, headers, status, param, message)


def test_the_tables_hold_at_least_thirty_distinct_cases() -> None:
    names = [case[0] for case in BAD_REQUESTS + HOSTILE_REQUESTS]
    assert len(names) == len(set(names)) >= 30


def _chunks(total_bytes: int, chunk_bytes: int = 64 * 1024):
    """A body sent with chunked transfer encoding (no Content-Length): the cap must hold while reading."""
    yield b'{"prompt": "'
    for _ in range(total_bytes // chunk_bytes):
        yield b"x" * chunk_bytes
    yield b'"}'


def test_a_chunked_body_over_the_cap_gets_413_without_a_content_length(tiny_app: ServedApp) -> None:
    request = httpx.Request("POST", f"{tiny_app.v1}/completions", content=_chunks(6 * 2**20), headers=JSON)
    assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
    with httpx.Client(timeout=60) as client:
        response = client.send(request)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_a_declared_length_over_the_cap_is_refused_before_reading(tiny_app: ServedApp) -> None:
    response = httpx.post(f"{tiny_app.v1}/completions", content=b"x" * (4 * 2**20 + 1), headers=JSON, timeout=60)
    assert response.status_code == 413
    assert "4194305 bytes" in response.json()["error"]["message"]


def test_a_burst_of_hostile_requests_leaves_the_server_serving(tiny_app: ServedApp) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=tiny_app.base_url, timeout=60) as client:
            sends = [
                client.post(path, content=body, headers=headers) if isinstance(body, bytes)
                else client.post(path, json=body)
                for _, path, body, headers, *_ in HOSTILE_REQUESTS
            ]  # fmt: skip
            return [response.status_code for response in await asyncio.gather(*sends)]

    statuses = asyncio.run(burst())
    assert all(400 <= status < 500 for status in statuses), statuses
    response = httpx.post(f"{tiny_app.v1}/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
