"""Faults in the serving path: an engine step that raises fails only its requests; a killed replica is restarted by
Serve, the requests it held end with a clear error (never a hang), and new requests are served."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import ray

from tests.serve.conftest import ServedApp, run, wait_until
from tests.serve.fault_injection import INJECTED_FAULT_MESSAGE, POISON_PROMPT
from tests.serve.stress_client import (
    Outcome,
    all_blocks_free,
    assert_openai_error,
    complete,
    live_replica_stats,
    random_ids,
    stream,
    tally,
)


def test_an_exception_in_an_engine_step_fails_its_request_and_the_engine_goes_on(stress_app: ServedApp) -> None:
    wait_until(lambda: all_blocks_free(stress_app.name, 2), timeout_s=60)
    replicas_before = set(live_replica_stats(stress_app.name))

    async def scenario() -> tuple[Outcome, Outcome, list[Outcome]]:
        async with httpx.AsyncClient(base_url=stress_app.base_url) as client:
            poisoned = await complete(client, POISON_PROMPT + random_ids(8, 1), max_tokens=4)
            poisoned_stream = await stream(client, POISON_PROMPT + random_ids(8, 2), max_tokens=4)
            healthy = await asyncio.gather(*(complete(client, random_ids(12, seed), max_tokens=6) for seed in range(6)))
            return poisoned, poisoned_stream, healthy

    poisoned, poisoned_stream, healthy = run(scenario())
    # The failed request: an error that says what happened (an engine failure is the server's: 500), OpenAI-shaped.
    assert poisoned.status == 500, poisoned
    assert_openai_error(poisoned)
    assert poisoned.body["error"]["code"] == "engine_error"
    assert INJECTED_FAULT_MESSAGE in poisoned.body["error"]["message"]
    assert poisoned_stream.status == 500 and INJECTED_FAULT_MESSAGE in poisoned_stream.body["error"]["message"]
    # Everything else is served by the same replicas: the engine loop kept running, nothing was restarted.
    assert [outcome.status for outcome in healthy] == [200] * len(healthy)
    assert all(outcome.body["usage"]["completion_tokens"] == 6 for outcome in healthy)
    wait_until(lambda: all_blocks_free(stress_app.name, 2), timeout_s=60)
    assert set(live_replica_stats(stress_app.name)) == replicas_before


def test_a_killed_replica_is_restarted_and_its_requests_end_with_a_clear_error(stress_app: ServedApp) -> None:
    _kill_a_replica_under_load(stress_app)


@pytest.mark.slow
def test_three_kills_in_a_row_are_survived(stress_app: ServedApp) -> None:
    for _ in range(3):
        _kill_a_replica_under_load(stress_app)


def _kill_a_replica_under_load(stress_app: ServedApp) -> None:
    app_name = stress_app.name
    wait_until(lambda: all_blocks_free(app_name, 2), timeout_s=60)
    names_before = set(live_replica_stats(app_name))

    def busy_replicas() -> list[str]:
        return sorted(name for name, s in live_replica_stats(app_name).items() if s["num_running"] > 0)

    async def scenario() -> tuple[str, list[Outcome]]:
        async with httpx.AsyncClient(base_url=stress_app.base_url,
                                     limits=httpx.Limits(max_connections=None)) as client:  # fmt: skip
            # Long streams; then a replica dies under some of them.
            streams = [asyncio.create_task(stream(client, random_ids(10, 100 + i), max_tokens=900)) for i in range(12)]
            # NOTE: the victim is a replica holding streams, whichever the router chose (not necessarily both).
            victim = (await asyncio.to_thread(wait_until, busy_replicas, 60, 0.2))[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            return victim, await asyncio.gather(*streams)

    victim, outcomes = run(scenario())
    print(f"\nstreams under a replica kill: {dict(tally(outcomes))}, "
          f"{sum(o.stream_error is not None for o in outcomes)} ended with an error event")  # fmt: skip
    assert all(outcome.status in (200, 503) for outcome in outcomes), outcomes  # no hang, no 500
    errored = [o for o in outcomes if o.status == 503 or o.stream_error is not None]
    assert errored, "the killed replica held streams; they must end with an error"
    for outcome in errored:
        error = outcome.stream_error or outcome.body["error"]
        assert error["code"] == "engine_unavailable" and "retry" in error["message"], outcome
    for outcome in outcomes:
        if outcome.status == 200 and outcome.stream_error is None:
            assert outcome.body == "[DONE]" and outcome.events >= 1

    # New requests are served (by the survivor at once, and by the replacement once it is up).
    async def served() -> bool:
        async with httpx.AsyncClient(base_url=stress_app.base_url) as client:
            outcomes = await asyncio.gather(*(complete(client, random_ids(8, seed), max_tokens=4) for seed in range(4)))
        return all(outcome.status == 200 for outcome in outcomes)

    wait_until(lambda: run(served()), timeout_s=60, interval_s=1)
    # Serve replaces the dead replica; every block is free again on both.
    wait_until(lambda: victim not in live_replica_stats(app_name) and all_blocks_free(app_name, 2), timeout_s=180,
               interval_s=1)  # fmt: skip
    assert len(set(live_replica_stats(app_name)) - names_before) == 1
    assert run(served())
