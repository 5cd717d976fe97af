"""Replicas spread over the workers, one ingress reaches them all, and losing a worker under load is survived.

The node-loss test removes a worker for good: it stays the last test of this package.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from tests.cluster.conftest import (
    ClusterApps,
    LocalCluster,
    deployment_replicas,
    finished_by_replica,
    replica_nodes,
    running_replicas,
)
from tests.serve.conftest import run, wait_until

# Every client call is bounded: a request that hangs fails the test instead of the test hanging.
CLIENT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def random_ids(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(count)]


def completion_body(seed: int, max_tokens: int, stream: bool = False) -> dict:
    return {"prompt": random_ids(8, seed), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}  # fmt: skip


async def wave(base_url: str, first_seed: int, size: int, max_tokens: int = 30) -> list[int]:
    """`size` concurrent completions; their status codes."""
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/completions", json=completion_body(seed, max_tokens))
            for seed in range(first_seed, first_seed + size)
        ))  # fmt: skip
    return [response.status_code for response in responses]


def serve_until_every_replica_finished_one(base_url: str, app_name: str, first_seed: int) -> dict[str, int]:
    """Waves of concurrent requests until every running replica has finished one more than before; the counts."""
    before = finished_by_replica(app_name)

    def every_replica_served() -> dict[str, int] | None:
        after = finished_by_replica(app_name)
        return after if after and all(after[name] > before.get(name, 0) for name in after) else None

    # Routing decisions made at the same moment may tie on a loaded machine; a router that sees every replica
    # serves all of them within a few waves, one that misses a replica never does.
    for attempt in range(8):
        statuses = run(wave(base_url, first_seed + 100 * attempt, size=8))
        assert statuses == [200] * 8, statuses
        if served := every_replica_served():
            return served
    raise AssertionError(f"some replica got no request: before {before}, after {finished_by_replica(app_name)}")


def test_replicas_land_on_both_workers(local_cluster: LocalCluster, cluster_apps: ClusterApps) -> None:
    nodes = wait_until(lambda: len(replica_nodes("spread")) == 2 and replica_nodes("spread"), timeout_s=120)
    workers = set(local_cluster.worker_nodes())
    assert set(nodes.values()) == workers, (nodes, workers, local_cluster.head_node_id)


def test_one_ingress_routes_to_replicas_on_every_node(local_cluster: LocalCluster, cluster_apps: ClusterApps) -> None:
    wait_until(lambda: len(replica_nodes("spread")) == 2, timeout_s=120)
    assert len(running_replicas("spread", "OpenAIIngress")) == 1
    served = serve_until_every_replica_finished_one(cluster_apps.spread, "spread", first_seed=0)
    nodes = replica_nodes("spread")
    assert {nodes[name] for name in served} == set(local_cluster.worker_nodes())


async def stream_until_end(client: httpx.AsyncClient, seed: int, started: asyncio.Event, counter: list[int],
                           expected: int) -> dict:  # fmt: skip
    """One streamed completion, read to its end: `{"finish_reason": ...}` or `{"error": {...}}` (or the status)."""
    body = completion_body(seed, max_tokens=900, stream=True)
    start = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            error = json.loads(await response.aread())["error"]
            return {"status": response.status_code, "error": error, "ended_at": time.monotonic()}
        counter[0] += 1
        if counter[0] == expected:
            started.set()
        outcome: dict = {"status": 200, "chunks": 0}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            outcome["chunks"] += 1
            if "error" in event:
                outcome["error"] = event["error"]
            elif event["choices"] and event["choices"][0]["finish_reason"]:
                outcome["finish_reason"] = event["choices"][0]["finish_reason"]
        outcome["seconds"] = round(time.monotonic() - start, 1)
        outcome["ended_at"] = time.monotonic()
        return outcome


def test_losing_a_worker_under_load(local_cluster: LocalCluster, cluster_apps: ClusterApps) -> None:
    wait_until(lambda: len(replica_nodes("spread")) == 2, timeout_s=120)
    ingress_nodes = set(replica_nodes("spread", "OpenAIIngress").values())
    # A worker with an engine replica of the app and not its ingress (the ingress may run on any node).
    victim_id = next(node_id for node_id in set(replica_nodes("spread").values()) if node_id not in ingress_nodes)
    survivor_id = next(node_id for node_id in local_cluster.worker_nodes() if node_id != victim_id)
    num_streams = 8  # max_num_seqs (4) per replica: once all have started, four run on each worker

    async def load_then_remove_victim() -> list[dict]:
        started = asyncio.Event()
        counter = [0]
        async with httpx.AsyncClient(base_url=cluster_apps.spread, timeout=CLIENT_TIMEOUT) as client:
            streams = [asyncio.create_task(stream_until_end(client, 1000 + i, started, counter, num_streams))
                       for i in range(num_streams)]  # fmt: skip
            await asyncio.wait_for(started.wait(), timeout=60)
            # NOTE: not graceful: the raylet and its workers are killed, as when a machine dies.
            victim = local_cluster.worker_nodes()[victim_id]
            await asyncio.to_thread(local_cluster.cluster.remove_node, victim, False)
            return await asyncio.gather(*streams)

    outcomes = run(load_then_remove_victim())
    # The streams on the lost node resume on the surviving replica (router/migration.py): every stream finishes,
    # none ends with an error event, none hangs (bounded client).
    failed = [outcome for outcome in outcomes if "error" in outcome]
    print(f"node loss: {len(outcomes) - len(failed)} of {len(outcomes)} streams finished; {outcomes}")
    assert not failed, outcomes
    assert all(outcome.get("finish_reason") == "length" for outcome in outcomes), outcomes

    # The service keeps answering, and the lost replica comes back on the remaining worker.
    wait_until(lambda: run(wave(cluster_apps.spread, 5000, size=1)) == [200], timeout_s=60, interval_s=1)
    wait_until(lambda: list(replica_nodes("spread").values()) == [survivor_id] * 2, timeout_s=90, interval_s=0.5)
    served = serve_until_every_replica_finished_one(cluster_apps.spread, "spread", first_seed=6000)
    assert len(served) == 2
    assert not [r for r in deployment_replicas("spread") if r["state"] == "RUNNING" and r["node_id"] == victim_id]
