"""The default model behind an API key: the key is required on /v1/* and /generate, never on /health."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve.conftest import ServedApp


def test_without_the_key_requests_get_401(default_app: ServedApp) -> None:
    for path, body in (("/v1/completions", {"prompt": "Hi"}), ("/generate", {"prompt": "Hi"})):
        response = httpx.post(default_app.base_url + path, json=body, timeout=60)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{default_app.v1}/models", timeout=60).status_code == 401


def test_a_wrong_key_gets_401(default_app: ServedApp) -> None:
    headers = {"Authorization": "Bearer not-the-key"}
    response = httpx.post(f"{default_app.v1}/completions", json={"prompt": "Hi"}, headers=headers, timeout=60)
    assert response.status_code == 401
    assert "not-the-key" not in response.text


def test_health_needs_no_key(default_app: ServedApp) -> None:
    assert httpx.get(f"{default_app.base_url}/health", timeout=60).json() == {"status": "ok"}


def test_api_key_is_off_unless_configured(tiny_app: ServedApp) -> None:
    assert httpx.get(f"{tiny_app.v1}/models", timeout=60).status_code == 200


def test_openai_client_with_the_key_chats_with_the_default_model(default_app: ServedApp) -> None:
    client = openai.OpenAI(base_url=default_app.v1, api_key=default_app.api_key, timeout=120, max_retries=0)
    chat = client.chat.completions.create(
        model=default_app.model_id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert "Paris" in chat.choices[0].message.content


def test_generate_as_the_seed_clients_call_it(default_app: ServedApp, tiny_app: ServedApp) -> None:
    headers = {"Authorization": f"Bearer {default_app.api_key}"}
    response = httpx.post(f"{default_app.base_url}/generate", json={"prompt": "The capital of France is",
                                                                    "max_tokens": 8}, headers=headers, timeout=120)
    assert response.status_code == 200
    assert "Paris" in response.json()["generated_text"]
    # The seed's clients send only a prompt, and no key where none is configured.
    plain = httpx.post(f"{tiny_app.base_url}/generate", json={"prompt": "Hello"}, timeout=120)
    assert plain.status_code == 200 and isinstance(plain.json()["generated_text"], str)


@pytest.mark.parametrize("body", [{}, {"prompt": ""}])
def test_generate_without_a_prompt_is_400(tiny_app: ServedApp, body: dict) -> None:
    response = httpx.post(f"{tiny_app.base_url}/generate", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Prompt is required"
