"""Client-chosen request ids (vLLM's `X-Request-Id` header and `request_id` body field): the response's id and header.

The engine's own request ids stay unique whatever clients send: two clients choosing the same id must not collide
in a replica's request registry, so the client's id is the response's, and the engine's carries it plus a random
suffix (for finding the request in replica logs).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import bad_request

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class RequestIds:
    """`response_id`: what the client sees (`id` of the response and of every chunk); `engine_id`: the replica's."""

    response_id: str
    engine_id: str


def make_request_ids(prefix: str, header_value: str | None, body_request_id: str | None) -> RequestIds:
    """The header wins over the body field, as in vLLM; with neither, a random id."""
    client_id = header_value or body_request_id
    if client_id is None:
        random_part = uuid.uuid4().hex
        return RequestIds(f"{prefix}-{random_part}", f"{prefix}-{random_part}")
    if len(client_id) > MAX_REQUEST_ID_CHARS or not client_id.isprintable():
        param = REQUEST_ID_HEADER if header_value else "request_id"
        raise bad_request(f"{param} must be at most {MAX_REQUEST_ID_CHARS} printable characters", param)
    response_id = f"{prefix}-{client_id}"
    return RequestIds(response_id, f"{response_id}-{uuid.uuid4().hex[:12]}")


class RequestIdHeaderMiddleware:
    """Echo the client's `X-Request-Id` on every response (errors included), as vLLM does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        if request_id is None:
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id.decode("latin-1")
            await send(message)

        await self.app(scope, receive, send_with_header)
