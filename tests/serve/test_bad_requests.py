"""Bad requests get 4xx with OpenAI error bodies that name the problem; the server serves normally afterwards."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import ServedApp

CHAT = [{"role": "user", "content": "Hi"}]

# (name, path, body (dict, or raw bytes), expected status, expected `param`, text the message must contain)
BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "Hi",', 400, None, "not valid JSON"),
    ("body not an object", "/v1/completions", b'["Hi"]', 400, None, "JSON object"),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("prompt of a wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt", ""),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt", "vocabulary"),
    ("temperature not a number", "/v1/completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature", ""),
    ("negative temperature", "/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature", ""),
    ("top_p zero", "/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p", ""),
    ("max_tokens zero", "/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", ""),
    ("negative seed", "/v1/completions", {"prompt": "Hi", "seed": -3}, 400, "seed", ""),
    ("max_tokens past the context", "/v1/completions", {"prompt": "Hi", "max_tokens": 5000}, 400, "max_tokens",
     "max_model_len 1024"),
    ("prompt too long", "/v1/completions", {"prompt": [100] * 1100}, 400, "prompt", "prompt is 1100 tokens"),
    ("n over the cap", "/v1/completions", {"prompt": "Hi", "n": 100}, 400, "n", "at most"),
    ("best_of below n", "/v1/completions", {"prompt": "Hi", "n": 2, "best_of": 1}, 400, None, "best_of"),
    ("unknown field", "/v1/completions", {"prompt": "Hi", "temprature": 0.5}, 400, "temprature", "unrecognized"),
    ("logit_bias key not a token id", "/v1/completions", {"prompt": "Hi", "logit_bias": {"hi": 1}}, 400,
     "logit_bias", "token ids"),
    ("logit_bias out of range", "/v1/completions", {"prompt": "Hi", "logit_bias": {"50": 101}}, 400,
     "logit_bias", "[-100, 100]"),
    ("logit_bias token outside the vocabulary (refused by the engine)", "/v1/completions",
     {"prompt": "Hi", "logit_bias": {str(10**9): 1}}, 400, None, "outside the vocabulary"),
    ("prompt_logprobs over the cap", "/v1/completions", {"prompt": "Hi", "prompt_logprobs": 21}, 400,
     "prompt_logprobs", "20"),
    ("echo with logprobs over the cap", "/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 21}, 400,
     "logprobs", "20"),
    ("prompt_logprobs streamed", "/v1/completions", {"prompt": "Hi", "prompt_logprobs": 1, "stream": True}, 400,
     "prompt_logprobs", "stream=false"),
    ("stop token id outside the vocabulary (refused by the engine)", "/v1/completions",
     {"prompt": "Hi", "stop_token_ids": [10**9]}, 400, None, "outside the vocabulary"),
    ("unknown model", "/v1/completions", {"prompt": "Hi", "model": "gpt-5"}, 404, "model", "does not exist"),
    ("missing messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages", "Field required"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages", ""),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400,
     "messages.0.role", ""),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400,
     "top_logprobs", "logprobs"),
    ("stream_options without stream", "/v1/chat/completions",
     {"messages": CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", ""),
    ("/generate without a prompt", "/generate", {"text": "Hi"}, 400, "prompt", "Prompt is required"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "message"),
                         [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])  # fmt: skip
def test_bad_request_gets_an_openai_error(
    tiny_app: ServedApp, path: str, body: dict | bytes, status: int, param: str | None, message: str
) -> None:
    post_and_expect_error(tiny_app, path, body, {"content-type": "application/json"}, status, param, message)


def post_and_expect_error(
    app: ServedApp, path: str, body: dict | bytes, headers: dict | None, status: int, param: str | None, message: str
) -> None:
    """POST `body` (raw bytes with `headers`, or JSON) and check the OpenAI-style refusal: status, type, field, text."""
    if isinstance(body, bytes):
        response = httpx.post(app.base_url + path, content=body, headers=headers, timeout=60)
    else:
        response = httpx.post(app.base_url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["param"] == param, error
    assert message in error["message"], error


def test_body_over_the_size_cap_gets_413(tiny_app: ServedApp) -> None:
    response = httpx.post(f"{tiny_app.v1}/completions", json={"prompt": "x" * (5 * 2**20)}, timeout=60)
    assert response.status_code == 413
    assert "limit" in response.json()["error"]["message"]


def test_unknown_route_and_wrong_method_get_openai_errors(tiny_app: ServedApp) -> None:
    missing = httpx.get(f"{tiny_app.v1}/engines", timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong_method = httpx.get(f"{tiny_app.v1}/completions", timeout=60)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_server_serves_normally_after_bad_requests(tiny_app: ServedApp) -> None:
    for case in BAD_REQUESTS[:5]:
        httpx.post(tiny_app.base_url + case[1], json=case[2] if isinstance(case[2], dict) else None, timeout=60)
    response = httpx.post(f"{tiny_app.v1}/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3
