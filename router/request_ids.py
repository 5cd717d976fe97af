"""Client-chosen request ids (vLLM's `request_id` body field and `X-Request-Id` header) as the response's id.

NOTE: Ray Serve's HTTP proxy already takes a client's `X-Request-Id` as its own request id, gives a request without
one a random id in that header, and echoes it on every response. So the header is always there: the body field,
being explicit, wins over it (vLLM prefers the header), and without a body field the response id matches the
`X-Request-Id` the client gets back and Serve's logs show.

The engine's own request ids stay unique whatever clients send: two clients choosing the same id must not collide
in a replica's request registry, so the client's id is the response's, and the engine's carries it plus a random
suffix (for finding the request in replica logs).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from router.errors import bad_request

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class RequestIds:
    """`response_id`: what the client sees (`id` of the response and of every chunk); `engine_id`: the replica's."""

    response_id: str
    engine_id: str


def make_request_ids(prefix: str, header_value: str | None, body_request_id: str | None) -> RequestIds:
    """The body field, else the header (see the module's note); with neither, a random id."""
    client_id = body_request_id or header_value
    if client_id is None:
        random_part = uuid.uuid4().hex
        return RequestIds(f"{prefix}-{random_part}", f"{prefix}-{random_part}")
    if len(client_id) > MAX_REQUEST_ID_CHARS or not client_id.isprintable():
        param = "request_id" if body_request_id else REQUEST_ID_HEADER
        raise bad_request(f"{param} must be at most {MAX_REQUEST_ID_CHARS} printable characters", param)
    response_id = f"{prefix}-{client_id}"
    return RequestIds(response_id, f"{response_id}-{uuid.uuid4().hex[:12]}")
