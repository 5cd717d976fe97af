"""Autoscaling on ongoing requests: a short burst scales the engine replicas up, and they scale back down after.

The `autoscale` app targets one ongoing request per replica, 1-2 replicas, 1 s upscale and 3 s downscale delays
(`BURST_AUTOSCALING`); bench/autoscaling.py measures the same behaviour at length.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from tests.cluster.conftest import BURST_AUTOSCALING, ClusterApps, finished_by_replica, running_replicas
from tests.cluster.test_placement import CLIENT_TIMEOUT, completion_body
from tests.serve.conftest import run, wait_until

NUM_CLIENTS = 6  # ongoing requests in the burst: six times the per-replica target


class ReplicaCountSampler(threading.Thread):
    """Samples the app's running engine replicas every `interval_s`; `scaled_up` is set once two or more run and
    every one of them has finished a request (a new replica that the router never used would not count)."""

    def __init__(self, app_name: str, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.app_name = app_name
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (seconds since start, running replicas)
        self.scaled_up = threading.Event()
        self.stop = threading.Event()
        self._baseline = finished_by_replica(app_name)
        self._start = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            count = len(running_replicas(self.app_name))
            self.samples.append((round(time.monotonic() - self._start, 2), count))
            if count >= 2 and not self.scaled_up.is_set():
                finished = finished_by_replica(self.app_name)
                if len(finished) >= 2 and all(n > self._baseline.get(name, 0) for name, n in finished.items()):
                    self.scaled_up.set()
            self.stop.wait(self.interval_s)


async def burst(base_url: str, until: threading.Event, deadline_s: float) -> list[int]:
    """`NUM_CLIENTS` clients sending completions back to back until `until` is set or the deadline; the statuses."""
    statuses: list[int] = []
    deadline = time.monotonic() + deadline_s

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        seed = 10_000 * (index + 1)
        while not until.is_set() and time.monotonic() < deadline:
            response = await client.post("/v1/completions", json=completion_body(seed, max_tokens=200))
            statuses.append(response.status_code)
            seed += 1

    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT) as client:
        await asyncio.gather(*(client_loop(client, index) for index in range(NUM_CLIENTS)))
    return statuses


def test_a_burst_scales_replicas_up_and_back_down(cluster_apps: ClusterApps) -> None:
    wait_until(lambda: len(running_replicas("autoscale")) == BURST_AUTOSCALING["min_replicas"], timeout_s=120)
    sampler = ReplicaCountSampler("autoscale")
    sampler.start()
    try:
        statuses = run(burst(cluster_apps.autoscale, until=sampler.scaled_up, deadline_s=90))
        assert statuses and set(statuses) == {200}, statuses
        assert sampler.scaled_up.is_set(), f"no second replica served within the burst: {sampler.samples}"
        # Load is gone: back to min_replicas after downscale_delay_s (plus the look-back window and shutdown).
        wait_until(lambda: sampler.samples[-1][1] == BURST_AUTOSCALING["min_replicas"], timeout_s=60)
    finally:
        sampler.stop.set()
        sampler.join(timeout=10)
    counts = [count for _, count in sampler.samples]
    peak = counts.index(max(counts))
    assert max(counts) >= 2 and counts[-1] == 1, sampler.samples
    assert 1 in counts[:peak], sampler.samples  # up from one (back down to one: counts[-1] above)
    assert max(counts) <= BURST_AUTOSCALING["max_replicas"], sampler.samples
