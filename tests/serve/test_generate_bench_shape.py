"""`/generate`'s extensions for the benchmark's load generator: n, ignore_eos, usage, and SSE streaming, in the
same shape the seed baselines (bench/baselines/) answer."""

from __future__ import annotations

import json

import httpx

from tests.serve.conftest import ServedApp


def test_generate_reports_usage_and_ignores_eos_when_asked(tiny_app: ServedApp) -> None:
    response = httpx.post(f"{tiny_app.base_url}/generate", timeout=120,
                          json={"prompt": "Hello", "max_tokens": 6, "ignore_eos": True})  # fmt: skip
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["generated_text"], str)
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] > 0


def test_generate_with_n_returns_a_list_of_texts(tiny_app: ServedApp) -> None:
    body = {"prompt": "Hello", "max_tokens": 3, "n": 3, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    answer = httpx.post(f"{tiny_app.base_url}/generate", json=body, timeout=120).json()
    assert len(answer["generated_text"]) == 3
    assert answer["usage"]["completion_tokens"] == 9


def test_generate_streams_token_counted_deltas_then_usage(tiny_app: ServedApp) -> None:
    body = {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tiny_app.base_url}/generate", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert sum(e["num_tokens"] for e in events if "num_tokens" in e) == 5
    assert all(e["index"] == 0 for e in events if "index" in e)
    assert events[-1]["usage"]["completion_tokens"] == 5


def test_generate_refuses_more_samples_than_the_ingress_allows(tiny_app: ServedApp) -> None:
    response = httpx.post(f"{tiny_app.base_url}/generate", json={"prompt": "Hi", "n": 1000}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"
