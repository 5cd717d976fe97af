"""The `priority` request field (vLLM's): accepted on completions and chat, and handed to the replica's `generate`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from replicas.contract import CompletionOutput, ModelInfo, RequestOutput
from router.ingress import OpenAIIngress


class _Method:
    def __init__(self, call: Any) -> None:
        self.remote = call


class _Response:
    """A replica call's response stream, as `DeploymentResponseGenerator` looks to the ingress."""

    def __init__(self, outputs: AsyncIterator[RequestOutput]) -> None:
        self.outputs = outputs

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self.outputs

    def cancel(self) -> None:
        pass


class RecordingReplicaHandle:
    """Stands in for the `LLMReplica` deployment handle: records each `generate` call's keywords."""

    def __init__(self) -> None:
        self.generate_calls: list[dict[str, Any]] = []
        self.model_info = _Method(self._model_info)
        self.generate = _Method(self._generate)

    def options(self, **_: Any) -> RecordingReplicaHandle:
        return self

    async def _model_info(self) -> dict[str, Any]:
        return ModelInfo("tiny", 1024, 16, 8, 64, True).to_dict()

    def _generate(self, **kwargs: Any) -> _Response:
        self.generate_calls.append(kwargs)

        async def outputs() -> AsyncIterator[RequestOutput]:
            completion = CompletionOutput(0, "ok", [5], finish_reason="length")
            yield RequestOutput(kwargs["request_id"], None, kwargs["prompt_token_ids"], [completion], finished=True)

        return _Response(outputs())


def ingress_with(handle: RecordingReplicaHandle, model_dir: Path) -> Any:
    """The ingress class itself, without Serve's ASGI wrapper (which needs a running Serve)."""
    cls = next(c for c in OpenAIIngress.func_or_class.__mro__ if "completions" in c.__dict__)
    ingress = cls.__new__(cls)
    cls.__init__(ingress, handle, {"model": str(model_dir)})
    return ingress


def json_request(body: dict[str, Any]) -> Request:
    payload = json.dumps(body).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": payload, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}  # fmt: skip
    return Request(scope, receive)


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("completions", {"prompt": "Hello", "max_tokens": 1}),
        ("completions", {"prompt": ["Hello", "World"], "max_tokens": 1}),
        ("chat_completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}),
    ],
)
@pytest.mark.parametrize("priority", [None, -5, 3])
def test_priority_is_passed_to_the_replica(
    default_model_dir: Path, endpoint: str, body: dict[str, Any], priority: int | None
) -> None:
    handle = RecordingReplicaHandle()
    ingress = ingress_with(handle, default_model_dir)
    request_body = body if priority is None else {**body, "priority": priority}
    asyncio.run(getattr(ingress, endpoint)(json_request(request_body)))
    assert handle.generate_calls and all(call["priority"] == (priority or 0) for call in handle.generate_calls)
