"""Admission control in the ingress: past a cap of requests in flight, answer 503 in OpenAI's shape at once.

Ray Serve queues HTTP requests for a busy ingress replica and, once its own queue is full, answers with a
plain-text 503 that OpenAI clients cannot parse. The ingress deployment's `max_ongoing_requests` is set well
above this cap, so overload is refused here first, with an OpenAI error body and `Retry-After`.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from router.errors import APIError

# Paths answered whatever the load: liveness probes must not fail because the server is busy.
EXEMPT_SUFFIXES = ("/health",)


@dataclass
class AdmissionLimit:
    """The cap and the count of one ingress replica (one per process: the ingress sets the cap when it starts)."""

    max_in_flight: int = 512
    retry_after_s: float = 1.0
    in_flight: int = 0
    num_refused: int = 0


class ConcurrencyLimitMiddleware:
    """Pure ASGI, so a refusal costs no request parsing and streaming responses count until their last byte."""

    def __init__(self, app: ASGIApp, limit: AdmissionLimit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").endswith(EXEMPT_SUFFIXES):
            await self.app(scope, receive, send)
            return
        limit = self.limit
        if limit.in_flight >= limit.max_in_flight:
            limit.num_refused += 1
            error = APIError(
                503,
                f"the server is at capacity ({limit.max_in_flight} requests in flight): retry after the delay in "
                "Retry-After",
                code="server_overloaded",
                retry_after_s=limit.retry_after_s,
            )
            await error.response()(scope, receive, send)
            return
        limit.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            limit.in_flight -= 1
