"""Metrics end to end: the served app under a short load, Ray's metrics endpoint, a real Prometheus scraping it,
and every dashboard panel's PromQL returning data through Prometheus's HTTP API."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy.grafana.dashboard import expand, load_dashboard, metric_names, panel_queries, panels
from deploy.grafana.snapshot import render_snapshot
from replicas.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from router.routing_policy import ReplicaView, rank_replicas
from tests.serve.test_request_router import report
from tests.serve.conftest import ServedApp, run, wait_until
from tests.serve.prometheus_server import PrometheusClient, running_prometheus

RATE_INTERVAL = "10s"  # $__rate_interval for 1 s scrapes: several samples per window
LOAD_DEADLINE_S = 60  # Ray's agent exports a new series within a couple of report periods (1 s in tests)


@pytest.fixture(scope="module")
def prometheus(metrics_export_port: int) -> Iterator[PrometheusClient]:
    with running_prometheus([f"127.0.0.1:{metrics_export_port}"], scrape_interval_s=1.0) as client:
        yield client


async def _load(app: ServedApp, first_seed: int = 0) -> None:
    """Streamed and plain completions sharing a prefix (prefix hits), /generate, and two client errors."""
    rng = random.Random(7)
    shared_prefix = [rng.randrange(100, 49000) for _ in range(48)]  # three full blocks of 16
    async with httpx.AsyncClient(base_url=app.base_url, timeout=120) as client:

        async def stream(seed: int) -> None:
            tail = [random.Random(first_seed + seed).randrange(100, 49000) for _ in range(5)]
            body = {"prompt": shared_prefix + tail, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                    "stream": True}  # fmt: skip
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                chunks = [line async for line in response.aiter_lines() if line.startswith("data:")]
            assert chunks[-1] == "data: [DONE]"

        await stream(0)  # the shared prefix gets cached before the rest arrive
        await asyncio.gather(*(stream(seed) for seed in range(1, 4)))
        await stream(4)
        response = await client.post("/generate", json={"prompt": "Once upon a time", "max_tokens": 4})
        assert response.status_code == 200
        assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})).status_code == 400
        assert (await client.get("/v1/no-such-endpoint")).status_code == 404


@pytest.fixture(scope="module")
def loaded(tiny_app: ServedApp, prometheus: PrometheusClient) -> float:
    """Runs the load twice once Prometheus is scraping; returns when the second run started (unix seconds).

    NOTE: a series that first appears with a value already counted has no increase for rate() to see (on this
    machine the tiny model's whole load can fit in one report period). The first run makes every series appear;
    the second, once Prometheus has them all, is what the panels must show.
    """
    wait_until(lambda: prometheus.query('up{job="ray"} == 1'), timeout_s=30)
    run(_load(tiny_app))
    wanted = {name for query in panel_queries(load_dashboard()) for name in metric_names(query.expr)}
    wait_until(lambda: wanted <= prometheus.metric_names(), timeout_s=LOAD_DEADLINE_S, interval_s=1.0)
    time.sleep(2.0)  # two scrapes of the first run's totals: the baseline the second run's increase is seen from
    start = time.time()
    run(_load(tiny_app, first_seed=100))
    return start


def _finite_values(result: list[dict]) -> list[float]:
    return [float(value) for series in result for _, value in series["values"] if math.isfinite(float(value))]


def test_every_dashboard_panel_returns_data_from_prometheus(prometheus: PrometheusClient, loaded: float) -> None:
    queries = panel_queries(load_dashboard())
    assert len({query.panel_id for query in queries}) >= 14

    def missing() -> dict[str, list]:
        end = time.time()
        results = {query: prometheus.query_range(expand(query.expr, RATE_INTERVAL), loaded, end) for query in queries}
        return {f"{q.panel_title} [{q.ref_id}]: {q.expr}": r[:3] for q, r in results.items() if not _finite_values(r)}

    deadline = time.monotonic() + LOAD_DEADLINE_S
    while (empty := missing()) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not empty, "panels without data:\n" + "\n".join(f"{name} -> {result}" for name, result in empty.items())


def test_dashboard_reads_only_metrics_the_real_scrape_contains(prometheus: PrometheusClient, loaded: float) -> None:
    wanted = {name for query in panel_queries(load_dashboard()) for name in metric_names(query.expr)}
    assert len(wanted) >= 14, wanted
    scraped = prometheus.metric_names()
    assert wanted <= scraped, f"not in the scrape: {sorted(wanted - scraped)}"


def test_load_is_counted_by_endpoint_status_model_and_routing_reason(
    prometheus: PrometheusClient, loaded: float
) -> None:
    def counted() -> bool:
        by_status = {
            (series["metric"]["endpoint"], series["metric"]["status_code"]): float(series["value"][1])
            for series in prometheus.query(
                'sum by (endpoint, status_code) (ray_paged_serve_router_requests_total{application="tiny"})'
            )
        }
        generated = prometheus.query('sum(ray_paged_serve_generation_tokens_total{model="tiny"})')
        decisions = prometheus.query('sum(ray_paged_serve_router_routing_decisions_total{application="tiny"})')
        hits = prometheus.query('sum(ray_paged_serve_prefix_cache_hits_total{model="tiny"})')
        finished = prometheus.query(
            'sum(ray_paged_serve_request_success_total{model="tiny", finished_reason="length"})'
        )
        return (
            by_status.get(("/v1/completions", "200"), 0) >= 5
            and by_status.get(("/v1/completions", "400"), 0) >= 1
            and by_status.get(("/generate", "200"), 0) >= 1
            and by_status.get(("unmatched", "404"), 0) >= 1
            and bool(generated) and float(generated[0]["value"][1]) >= 5 * 12 + 4
            and bool(decisions) and float(decisions[0]["value"][1]) >= 5
            and bool(hits) and float(hits[0]["value"][1]) >= 16
            and bool(finished) and float(finished[0]["value"][1]) >= 6
        )  # fmt: skip

    wait_until(counted, timeout_s=LOAD_DEADLINE_S, interval_s=1.0)
    replicas = prometheus.query('count by (replica) (ray_paged_serve_kv_cache_usage_perc{model="tiny"})')
    assert len(replicas) >= 2  # tagged per replica (the app has two)


def test_snapshot_renders_every_panel_from_live_prometheus(
    prometheus: PrometheusClient, loaded: float, tmp_path: Path
) -> None:
    wait_until(lambda: prometheus.query("ray_paged_serve_e2e_request_latency_seconds_bucket"), timeout_s=30)
    out = tmp_path / "snapshot.png"
    dashboard = load_dashboard()

    def render() -> dict[str, int]:
        return render_snapshot(prometheus.url, out, dashboard, minutes=(time.time() - loaded + 10) / 60,
                               rate_interval=RATE_INTERVAL)  # fmt: skip

    deadline = time.monotonic() + LOAD_DEADLINE_S
    while not all((drawn := render()).values()) and time.monotonic() < deadline:
        time.sleep(2.0)
    assert len(drawn) == len(panels(dashboard))
    assert all(drawn.values()), f"panels drawn without data: {[title for title, n in drawn.items() if not n]}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- without Ray: what the replica records from engine outputs and stats --------------------------------------


class FakeEngine:
    def __init__(self, stats: EngineStats) -> None:
        self.current = stats
        self.engine = type("LLMEngineStub", (), {"recent_step_num_tokens": deque([3, 1, 1])})()

    def stats(self) -> EngineStats:
        return self.current


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict | None]] = []

    def observe(self, value: float, tags: dict | None = None) -> None:
        self.calls.append((value, tags))

    inc = set = observe


def engine_stats(**changes: int) -> EngineStats:
    fields = dict(num_running=2, num_waiting=1, num_free_blocks=30, num_total_blocks=40, num_cached_blocks=0,
                  block_size=16, kv_slots_allocated=0, kv_slots_live=0, prefix_cache_queries=64,
                  prefix_cache_hits=32, num_preemptions=0, num_prompt_tokens=100, num_generation_tokens=10,
                  num_steps=5, num_requests_finished=0)  # fmt: skip
    return EngineStats(**{**fields, **changes})


@pytest.fixture
def replica_metrics():
    from replicas.metrics import ReplicaMetrics

    metrics = ReplicaMetrics(FakeEngine(engine_stats()), model="m", replica="r", refresh_period_s=3600)
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "request_queue_time",
                 "request_success", "iteration_tokens", "kv_cache_usage_perc", "generation_tokens",
                 "prefix_cache_hits", "num_preemptions"):  # fmt: skip
        setattr(metrics, name, Recorder())
    yield metrics
    metrics.shutdown()


def output(last_token_time: float, finish_reason: str | None = None) -> RequestOutput:
    timings = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.0,
                             last_token_time=last_token_time)  # fmt: skip
    completion = CompletionOutput(0, "x", [5], finish_reason)
    return RequestOutput("req", None, [1, 2], [completion], finish_reason is not None, metrics=timings)


def test_replica_records_ttft_queue_time_token_gaps_and_e2e_from_engine_timestamps(replica_metrics) -> None:
    for out in (output(11.0), output(11.25), output(11.75, finish_reason="length")):
        replica_metrics.observe(out)
    assert [value for value, _ in replica_metrics.time_to_first_token.calls] == [1.0]
    assert [value for value, _ in replica_metrics.request_queue_time.calls] == [0.5]
    assert [value for value, _ in replica_metrics.inter_token_latency.calls] == [0.25, 0.5]
    assert [value for value, _ in replica_metrics.e2e_request_latency.calls] == [1.75]
    assert replica_metrics.request_success.calls == [(1, {"finished_reason": "length"})]


def test_replica_counts_a_cancelled_request_as_aborted(replica_metrics) -> None:
    replica_metrics.observe(output(11.0))
    replica_metrics.cancelled("req")
    assert replica_metrics.request_success.calls == [(1, {"finished_reason": "abort"})]
    assert replica_metrics.e2e_request_latency.calls == []


def test_replica_advances_counters_by_what_changed_between_snapshots(replica_metrics) -> None:
    replica_metrics.refresh()
    replica_metrics.engine.current = engine_stats(num_generation_tokens=17, prefix_cache_hits=32, num_running=0)
    replica_metrics.refresh()
    assert [value for value, _ in replica_metrics.generation_tokens.calls] == [10, 7]
    assert [value for value, _ in replica_metrics.prefix_cache_hits.calls] == [32]  # no change, no increment
    assert replica_metrics.num_preemptions.calls == []
    assert [value for value, _ in replica_metrics.kv_cache_usage_perc.calls] == [0.25, 0.25]
    assert [value for value, _ in replica_metrics.iteration_tokens.calls] == [3, 1, 1]  # each step, drained


def test_routing_ranks_carry_the_reason_each_replica_is_offered() -> None:
    fresh = report(free=10)
    replicas = [ReplicaView("a", 8, 0, fresh, prefix_blocks=2), ReplicaView("b", 8, 0, fresh),
                ReplicaView("c", 8, 8, fresh)]  # fmt: skip
    ranks = rank_replicas(replicas, num_request_blocks=3, rng=random.Random(0))
    assert ranks == [(["a"], "prefix_hit"), (["b"], "least_loaded"), (["c"], "fallback")]  # c is saturated
    stale = [ReplicaView(name, 8, 0, None) for name in "abc"]
    assert {reason for _, reason in rank_replicas(stale, 0, rng=random.Random(0))} == {"fallback"}
