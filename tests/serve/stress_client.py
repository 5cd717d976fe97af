"""Client side of the load, disconnect and fault tests: bounded requests that report how they ended."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.serve.conftest import replica_stats

# No request may take longer than this; a hang fails the test instead of stalling it.
CLIENT_TIMEOUT_S = 120.0


def random_ids(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49152) for _ in range(length)]


@dataclass
class Outcome:
    """How one request ended: `status` is the HTTP status, or `timeout`/`transport` when no response came."""

    status: int | str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    events: int = 0  # streaming: data events received before it ended
    stream_error: dict | None = None  # streaming: an error event sent after the 200
    dropped: bool = False  # the client walked away mid-stream on purpose


def assert_openai_error(outcome: Outcome) -> None:
    """A refusal: OpenAI's error shape, and for 429/503 a Retry-After the client can honour."""
    error = outcome.body.get("error", {}) if isinstance(outcome.body, dict) else None
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, outcome
    if outcome.status in (429, 503):
        assert int(outcome.headers["retry-after"]) >= 1, outcome


async def complete(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> Outcome:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    try:
        response = await client.post("/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)
    except httpx.TimeoutException:
        return Outcome("timeout")
    except httpx.TransportError as error:
        return Outcome("transport", body=repr(error))
    try:
        payload = response.json()
    except ValueError:
        payload = response.text
    return Outcome(response.status_code, payload, dict(response.headers))


async def stream(
    client: httpx.AsyncClient, prompt: list[int], max_tokens: int, drop_after: int | None = None
) -> Outcome:
    """A streaming completion; with `drop_after`, disconnect after that many events (0: right after the headers)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    outcome = Outcome("transport")
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            async with client.stream("POST", "/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S) as response:
                outcome = Outcome(response.status_code, headers=dict(response.headers))
                if response.status_code != 200:
                    outcome.body = json.loads(await response.aread())
                    return outcome
                if drop_after == 0:
                    outcome.dropped = True
                    return outcome  # leaving the block closes the connection mid-response
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        outcome.body = "[DONE]"
                        return outcome
                    event = json.loads(data)
                    if "error" in event:
                        outcome.stream_error = event["error"]
                        continue
                    outcome.events += 1
                    if drop_after is not None and outcome.events >= drop_after:
                        outcome.dropped = True
                        return outcome
    except TimeoutError:
        return Outcome("timeout")
    except httpx.TransportError as error:
        outcome.status, outcome.body = "transport", repr(error)
    return outcome


def tally(outcomes: list[Outcome]) -> Counter:
    return Counter(str(outcome.status) for outcome in outcomes)


def live_replica_stats(app_name: str) -> dict[str, dict[str, Any]]:
    """`replica_stats`, skipping a replica that is dead or not yet started (its name may linger a moment)."""
    try:
        return replica_stats(app_name)
    except Exception:  # noqa: BLE001 — one dead actor fails the batch; ask each one alone
        pass
    import ray

    stats = {}
    prefix = f"SERVE_REPLICA::{app_name}#LLMReplica#"
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and actor["name"].startswith(prefix):
            try:
                handle = ray.get_actor(actor["name"], namespace="serve")
                stats[actor["name"]] = ray.get(handle.record_routing_stats.remote(), timeout=10)
            except Exception:  # noqa: BLE001
                continue
    return stats


def replica_rss_bytes(app_name: str) -> dict[str, int]:
    """Resident memory of each live replica process."""
    import ray

    def rss(_actor: Any) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    names = list(live_replica_stats(app_name))
    actors = {name: ray.get_actor(name, namespace="serve") for name in names}
    return {name: ray.get(actor.__ray_call__.remote(rss), timeout=30) for name, actor in actors.items()}


def all_blocks_free(app_name: str, expected_replicas: int) -> bool:
    stats = live_replica_stats(app_name)
    return len(stats) == expected_replicas and all(
        s["num_free_blocks"] == s["num_total_blocks"] and s["num_running"] == 0 and s["num_waiting"] == 0
        for s in stats.values()
    )
