"""Every replica gone and none coming back: the requests in flight end with the documented error — 503
`engine_unavailable`, or mid-stream the SSE error event — at their migration deadline, never a hang. The app's
replicas refuse to start while `refuse_start_flag` exists (tests/serve/fault_injection.py).

A *new* request in that state is held by Serve's router until a replica starts (a deployment that was once healthy
stays "available" with none running): the ingress answers it 503 `engine_unavailable` when its first output has
not come by the same deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray

from tests.serve.conftest import ServedApp, run, wait_until
from tests.serve.stress_client import live_replica_stats, random_ids
from tests.serve.test_faults import Completion, greedy_completion

APP = "doomed"
DEADLINE_S = 20.0  # the app's ingress.migration_deadline_s
# No hang: the error is due at the request's deadline; the rest is slack for a loaded 2-core machine.
NO_HANG_S = DEADLINE_S + 100.0
MAX_TOKENS = 900  # long enough to be running when both replicas die


@pytest.fixture(scope="module")
def doomed_app(serve_port: int, tiny_llama_dir: Path) -> Iterator[ServedApp]:
    """Two fault-injecting replicas of the tiny Llama in an app of its own (both are killed), removed afterwards."""
    from unittest import mock

    from ray import serve

    import router.app
    from tests.serve.fault_injection import FaultInjectingReplica, refuse_start_flag

    with mock.patch.object(router.app, "LLMReplica", FaultInjectingReplica):
        app = router.app.build_app({
            "model": str(tiny_llama_dir),
            "served_model_name": APP,
            "num_replicas": 2,
            "replica_num_cpus": 0.1,
            "ingress_num_cpus": 0.1,
            "engine": {
                "dtype": "float32",
                "kv_cache_memory_bytes": 8 * 2**20, "max_num_seqs": 8, "max_model_len": 1024, "num_threads": 1
            },
            "routing_stats_period_s": 0.5,
            "ingress": {"migration_deadline_s": DEADLINE_S},
        })  # fmt: skip
    serve.run(app, name=APP, route_prefix=f"/{APP}")
    flag = refuse_start_flag(APP)
    try:
        yield ServedApp(APP, f"http://127.0.0.1:{serve_port}/{APP}", APP)
    finally:
        flag.unlink(missing_ok=True)
        serve.delete(APP)


def test_with_every_replica_dead_requests_end_with_the_unavailable_error(doomed_app: ServedApp) -> None:
    from tests.serve.fault_injection import refuse_start_flag

    wait_until(lambda: len(live_replica_stats(APP)) == 2, timeout_s=180, interval_s=0.5)

    async def scenario() -> tuple[list[Completion], float]:
        async with httpx.AsyncClient(base_url=doomed_app.base_url, limits=httpx.Limits(max_connections=None)) as client:
            in_flight = [asyncio.create_task(greedy_completion(client, random_ids(10, 700 + i), MAX_TOKENS, i % 2 == 0))
                         for i in range(4)]  # fmt: skip
            await asyncio.to_thread(wait_until, lambda: sum(s["num_running"] for s in live_replica_stats(APP).values())
                                    >= 4, 120, 0.2)  # fmt: skip
            refuse_start_flag(APP).touch()
            for name in live_replica_stats(APP):
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            killed = time.monotonic()
            done = await asyncio.wait_for(asyncio.gather(*in_flight), NO_HANG_S)
            # Requests that arrive with none running: the serving replica could not even be picked.
            arrived = [asyncio.create_task(greedy_completion(client, random_ids(10, 710 + i), 8, i % 2 == 0))
                       for i in range(2)]  # fmt: skip
            done += await asyncio.wait_for(asyncio.gather(*arrived), NO_HANG_S)
            return done, time.monotonic() - killed

    done, elapsed_s = run(scenario())
    for i, outcome in enumerate(done[4:]):
        assert outcome.error is not None and outcome.error["code"] == "engine_unavailable", (i, outcome)
        assert not outcome.token_ids and outcome.status in (200, 503), (i, outcome)  # 200: the SSE error event
    done = done[:4]
    for i, outcome in enumerate(done):
        streamed = i % 2 == 0
        assert outcome.error is not None and outcome.error["code"] == "engine_unavailable", (i, outcome)
        if streamed:  # the SSE error event after the tokens it got
            assert outcome.status == 200 and not outcome.usages, (i, outcome)
            assert 0 < len(outcome.token_ids) < MAX_TOKENS, (i, outcome)
        else:
            assert outcome.status == 503, (i, outcome)
    assert elapsed_s < 2 * NO_HANG_S  # in-flight, then new requests: each within its deadline
