"""Ingress metrics for Prometheus, recorded with `ray.util.metrics` (exported by Ray with its `ray_` prefix).

- `paged_serve_router_requests_total{endpoint, method, status_code, application}`: every HTTP request the ingress
  answered, by route template (`/v1/completions`; `unmatched` for unknown paths) and status code. A streamed
  response counts with the status it started with (an error after the first byte is sent as an SSE event).
- `paged_serve_router_routing_decisions_total{reason, application}`: where the KV-aware request router sent each
  engine call, by why: `prefix_hit` (the replica holding the request's longest cached prefix), `least_loaded`
  (fewest waiting, most free KV blocks, from fresh replica stats) or `fallback` (stale stats: power of two
  choices; or only saturated replicas were left).
- `paged_serve_router_routing_predicted_hit_tokens_total{application}`: prompt tokens the KV-aware router expected
  the chosen replica's prefix cache to hold, summed over its routing decisions; compare with the replicas'
  `paged_serve_prefix_cache_hits_total` (what they actually held) to see how well the router predicts.
- `paged_serve_router_migrations_total{reason, application}`: requests resumed on another replica after the one
  serving them was lost (router/migration.py), by why: `actor_died`, `actor_unavailable`, `engine_dead`,
  `no_replica`; and `gave_up`: a lost request past its `max_migrations` or deadline, answered with the error.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ray.util.metrics import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

PREFIX = "paged_serve_router_"
ROUTING_REASONS = ("prefix_hit", "least_loaded", "fallback")
MIGRATION_REASONS = ("actor_died", "actor_unavailable", "engine_dead", "no_replica", "gave_up")


@functools.cache
def http_requests() -> Counter:
    # Created on first use, in the process that records (the ingress replica), not wherever this module is imported.
    return Counter(
        PREFIX + "requests", "HTTP requests answered by the ingress, by endpoint and status code.",
        tag_keys=("endpoint", "method", "status_code", "application"),
    )  # fmt: skip


@functools.cache
def routing_decisions() -> Counter:
    return Counter(
        PREFIX + "routing_decisions", "Engine calls routed to a replica, by the reason that replica was chosen.",
        tag_keys=("reason", "application"),
    )  # fmt: skip


def record_routing_decision(reason: str, application: str) -> None:
    routing_decisions().inc(1, tags={"reason": reason, "application": application})


@functools.cache
def predicted_hit_tokens() -> Counter:
    return Counter(
        PREFIX + "routing_predicted_hit_tokens", "Prompt tokens the router expected the chosen replica to hold cached.",
        tag_keys=("application",),
    )  # fmt: skip


def record_predicted_hit_tokens(tokens: int, application: str) -> None:
    if tokens > 0:  # Ray's `inc` refuses 0
        predicted_hit_tokens().inc(tokens, tags={"application": application})


def start_predicted_hit_series(application: str) -> None:
    """Export the predicted-hit count at 0 before the first hit, so the dashboard's rate is 0 rather than no data."""
    _start_at_zero(predicted_hit_tokens(), {"application": application})


@functools.cache
def migrations() -> Counter:
    return Counter(
        PREFIX + "migrations", "Requests resumed on another replica after theirs was lost, by reason (gave_up: not).",
        tag_keys=("reason", "application"),
    )  # fmt: skip


def record_migration(reason: str) -> None:
    migrations().inc(1, tags={"reason": reason, "application": _application()})


def start_migration_series() -> None:
    """Export every reason's migration count at 0 before the first migration (most runs see none), so the rate
    is defined and the dashboard shows 0 rather than no data. NOTE: Ray's `inc` refuses 0; `_record` is under it."""
    for reason in MIGRATION_REASONS:
        _start_at_zero(migrations(), {"reason": reason, "application": _application()})


def _start_at_zero(counter: Counter, tags: dict[str, str]) -> None:
    try:
        counter._record(0, tags=tags)  # noqa: SLF001
    except Exception:  # noqa: BLE001 — a Ray without it: the series appears at the first increment instead
        logger.debug("could not start %s at 0", counter.info.get("name", "a counter"), exc_info=True)


class RequestMetricsMiddleware:
    """Counts each HTTP request by route and status code once its response starts (or it fails).

    A plain ASGI middleware, not Starlette's `BaseHTTPMiddleware`: that one wraps streaming responses in its own
    task, which would hide a client's disconnect from the endpoint (and so keep a cancelled request generating).
    """

    def __init__(self, app: ASGIApp, application: str | None = None) -> None:
        self.app = app
        self.application = application

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status_code: int | None = None

        async def send_with_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except BaseException:
            if status_code is None:
                status_code = 500  # the outermost error handler answers 500 for what escaped the app
            raise
        finally:
            if status_code is not None:
                http_requests().inc(1, tags={
                    "endpoint": _endpoint(scope),
                    "method": scope.get("method", ""),
                    "status_code": str(status_code),
                    "application": self.application or _application(),
                })  # fmt: skip


def _endpoint(scope: Scope) -> str:
    """The matched route's path template: bounded label values whatever paths clients send."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


@functools.cache
def _application() -> str:
    """The Serve application this ingress replica belongs to ("" outside Serve)."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 — not in a Serve replica
        return ""
