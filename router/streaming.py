"""Replica output streams in the ingress: error mapping, priming before the response starts, fan-in, SSE."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentResponseGenerator

from replicas.contract import EngineUnavailableError, RequestOutput, RequestRejectedError
from router.errors import APIError

logger = logging.getLogger(__name__)

# Seconds a client is told to wait before retrying when the engine is unavailable.
UNAVAILABLE_RETRY_AFTER_S = 5.0


def to_api_error(error: BaseException) -> APIError:
    """A failure of a replica call as what the client should see (a RayTaskError carries the replica's cause)."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, RequestRejectedError):
        return APIError(400, str(cause), param=getattr(cause, "param", None))
    if isinstance(cause, BackPressureError):
        return APIError(
            cause.status_code,
            "the server is at capacity (all replicas busy and their queues full): retry after the delay in "
            "Retry-After",
            code="server_overloaded",
            retry_after_s=cause.retry_after_s if cause.retry_after_s is not None else 1.0,
        )
    if isinstance(cause, (EngineUnavailableError, DeploymentUnavailableError, RayActorError, ActorDiedError,
                          ActorUnavailableError)):  # fmt: skip
        return APIError(
            503, f"no engine replica is available ({type(cause).__name__}): retry shortly",
            code="engine_unavailable", retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
        )  # fmt: skip
    logger.error("replica call failed: %r", error)
    return APIError(500, f"the engine failed this request: {type(cause).__name__}: {cause}", code="engine_error")


@contextlib.contextmanager
def own_request_id() -> Iterator[None]:
    """Give the handle call made inside a request id of its own, not the HTTP request's.

    NOTE: a call inherits Serve's internal request id from the HTTP request it serves, and a RequestRouter
    without FIFO matching hands a chosen replica to the pending call *with that id*. Several concurrent calls for
    one HTTP request (a completions request with several prompts) would share the id and all but one would wait
    forever. This uses Serve's private request context; if that ever changes, calls go out with the shared id.
    """
    try:
        from ray.serve import context as serve_context

        current = serve_context._get_serve_request_context()
        token = serve_context._serve_request_context.set(
            dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex)
        )
    except (AttributeError, TypeError, ImportError):  # Serve's private API moved
        logger.warning("cannot give replica calls their own request id; concurrent sub-requests may stall")
        yield
        return
    try:
        yield
    finally:
        serve_context._serve_request_context.reset(token)


async def replica_outputs(response: DeploymentResponseGenerator) -> AsyncIterator[RequestOutput]:
    """The deltas of one replica call; leaving early (a disconnect, an error) cancels it, which aborts the request."""
    finished = False
    try:
        async for output in response:
            if output.error is not None:
                if output.error_status == 400:  # the request's own fault (its grammar cannot go on)
                    raise APIError(400, output.error)
                raise APIError(500, f"the engine failed this request: {output.error}", code="engine_error")
            yield output
            if output.finished:
                finished = True
    except (APIError, asyncio.CancelledError, GeneratorExit):
        raise
    except RequestCancelledError:
        raise asyncio.CancelledError() from None
    except Exception as error:  # noqa: BLE001 — every other failure becomes an OpenAI error
        raise to_api_error(error) from error
    finally:
        if not finished:
            _cancel(response)


def _cancel(response: DeploymentResponseGenerator) -> None:
    """Best-effort cancel. NOTE: Serve's `cancel()` re-raises how the call ended (a backpressure refusal, an earlier
    cancel); raised from a `finally`, that would replace the error the client should see."""
    try:
        response.cancel()
    except (Exception, concurrent.futures.CancelledError):  # noqa: BLE001
        pass


class PrimedStream:
    """A stream whose first item was already awaited, so errors surface before any response byte is sent."""

    def __init__(self, first: Any, rest: AsyncIterator[Any]) -> None:
        self.first = first
        self.rest = rest

    async def __aiter__(self) -> AsyncIterator[Any]:
        yield self.first
        async for item in self.rest:
            yield item

    async def aclose(self) -> None:
        await self.rest.aclose()  # type: ignore[attr-defined]


async def prime(streams: list[AsyncIterator[Any]]) -> list[PrimedStream]:
    """Await every stream's first item; if any fails, close all and raise its error."""
    firsts = await asyncio.gather(*(anext(stream) for stream in streams), return_exceptions=True)
    error = next((result for result in firsts if isinstance(result, BaseException)), None)
    if error is not None:
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        if isinstance(error, StopAsyncIteration):
            raise APIError(500, "the engine ended a request without output", code="engine_error")
        raise error
    return [PrimedStream(first, stream) for first, stream in zip(firsts, streams)]


async def merge(streams: list[PrimedStream]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several streams as they come, tagged with the stream's position; one stream needs no tasks."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(position: int, stream: PrimedStream) -> None:
        try:
            async for item in stream:
                await queue.put((position, item))
        except BaseException as error:  # noqa: BLE001 — handed to the consumer, which re-raises it
            await queue.put((position, error))
            return
        await queue.put((position, done))

    tasks = [asyncio.create_task(pump(position, stream)) for position, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: Any) -> str:
    """One server-sent event; `payload` is a pydantic model, a dict, or the final `[DONE]`."""
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    if hasattr(payload, "model_dump_json"):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"
