"""schemathesis against the ingress's own OpenAPI schema, on the live tiny app: requests that fit the schema and
requests that break it, and not one 5xx. The default run sends a few dozen; `pytest -m slow` a thousand."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from router.ingress import app
from tests.serve.conftest import ServedApp

SCHEMA = schemathesis.openapi.from_dict(app.openapi())


@pytest.fixture(autouse=True)
def ieee_subnormals() -> Iterator[None]:
    """Hypothesis refuses to draw floats while subnormals flush to zero, a process-wide CPU flag that an engine run
    earlier in this process (replicas/model_runner.py, for speed) turned on; off while fuzzing, then restored."""
    was_flushing = _flushes_subnormals()
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(was_flushing)


def _flushes_subnormals() -> bool:
    smallest_normal = sys.float_info.min
    return smallest_normal / 2.0 == 0.0


def test_the_schema_documents_every_route_and_its_body() -> None:
    paths = SCHEMA.raw_schema["paths"]
    assert set(paths) >= {"/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/generate"}
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        assert "requestBody" in paths[path]["post"], path


def _send(case: schemathesis.Case, base_url: str) -> httpx.Response:
    """The case over httpx. NOTE: not `case.call()`: schemathesis' requests transport breaks when urllib3-future
    (pulled in by grafana-client through niquests) has replaced urllib3 in the environment."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    content = kwargs.get("data")
    if isinstance(kwargs.get("json"), dict):
        _cap_generation(kwargs["url"], kwargs["json"])
    return httpx.request(
        kwargs["method"], kwargs["url"], headers=kwargs.get("headers"), params=kwargs.get("params"),
        json=kwargs.get("json"), content=content.encode() if isinstance(content, str) else content, timeout=120,
    )  # fmt: skip


# The fields that bound a request's generation, by route; the first one is what an absent value defaults from.
GENERATION_FIELDS = {
    "/v1/completions": ("max_tokens",),
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/generate": ("max_tokens",),
}


def _cap_generation(path: str, body: dict) -> None:
    """At most 8 new tokens per valid request: the fuzzer is after the server's answers, not long generations (an
    absent `max_tokens` means the rest of the context window). Values of a wrong type or range are left alone."""
    fields = next((fields for route, fields in GENERATION_FIELDS.items() if path.endswith(route)), ())
    for position, field in enumerate(fields):
        value = body.get(field)
        if (value is None and position == 0) or (type(value) is int and value > 8):
            body[field] = 8


def _fuzz(served: ServedApp, mode: GenerationMode, max_examples: int) -> Counter:
    statuses: Counter = Counter()

    @given(case=SCHEMA.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def no_server_errors(case: schemathesis.Case) -> None:
        response = _send(case, served.base_url)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    no_server_errors()
    print(f"\nschemathesis {mode.value}: {sum(statuses.values())} requests, statuses {dict(statuses)}")
    return statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_5xx(tiny_app: ServedApp, mode: GenerationMode) -> None:
    statuses = _fuzz(tiny_app, mode, max_examples=25)
    assert sum(statuses.values()) >= 25


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_many_fuzzed_requests_never_get_a_5xx(tiny_app: ServedApp, mode: GenerationMode) -> None:
    statuses = _fuzz(tiny_app, mode, max_examples=500)
    assert sum(statuses.values()) >= 500
