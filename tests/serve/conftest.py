"""One Ray instance and one Serve instance per test session, on loopback; apps deployed once and shared.

- `tiny_app`: two replicas of the tiny seeded Llama, no API key, small queues (for backpressure).
- `default_app`: one replica of the default model, with an API key.
- `stress_app`: two fault-injecting replicas of the tiny Llama and a small ingress cap, for load, disconnect and
  fault tests (a replica may be killed there without disturbing the other apps).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from replicas import OPENMP_ENV

# Before Ray is imported: local test clusters run without token auth (production configs leave it on).
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
TINY_MAX_NUM_SEQS = 4
TINY_MAX_QUEUED = 4
STRESS_MAX_NUM_SEQS = 16
STRESS_MAX_QUEUED = 16  # slots + queue (48) < the ingress cap: a burst meets both 429 and 503
STRESS_MAX_CONCURRENT = 64  # the ingress's cap: beyond it, 503 before Serve's own queue


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "serve: integration tests against a real Ray Serve instance on loopback")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.serve)


@dataclass
class ServedApp:
    name: str
    base_url: str  # e.g. http://127.0.0.1:PORT/tiny
    model_id: str
    api_key: str | None = None

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serve_port() -> Iterator[int]:
    import ray
    from ray import serve

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), **OPENMP_ENV,
                                  "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}},
        # Prometheus endpoint for tests/serve/test_metrics.py; workers report to it every second (default 10 s).
        _metrics_export_port=_free_port(),
        _system_config={"metrics_report_interval_ms": 1000},
    )  # fmt: skip
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def metrics_export_port(serve_port: int) -> int:
    """The session Ray's Prometheus endpoint: http://127.0.0.1:PORT/metrics."""
    import ray

    return int(ray.nodes()[0]["MetricsExportPort"])


@pytest.fixture(scope="session")
def served_apps(serve_port: int, tiny_llama_dir: Path, default_model_dir: Path) -> dict[str, ServedApp]:
    """Both apps deployed together (replicas start in parallel): most of the suite's set-up time."""
    from ray import serve

    from router.app import build_app

    tiny = build_app({
        "model": str(tiny_llama_dir),
        "served_model_name": "tiny",
        "num_replicas": 2,
        "replica_num_cpus": 0.5,
        "ingress_num_cpus": 0.25,
        "engine": {
            "dtype": "float32", "kv_cache_memory_bytes": 8 * 2**20, "max_num_seqs": TINY_MAX_NUM_SEQS, "num_threads": 1
        },
        "max_queued_requests": TINY_MAX_QUEUED,
        "routing_stats_period_s": 0.5,
    })  # fmt: skip
    default = build_app({
        "model": str(default_model_dir),
        "replica_num_cpus": 1,
        "ingress_num_cpus": 0.25,
        "engine": {"dtype": "float32", "kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 1024, "num_threads": 1},
        "ingress": {"api_key": API_KEY},
    })  # fmt: skip
    stress = _stress_app(tiny_llama_dir)
    serve.run_many([
        serve.RunTarget(target=tiny, name="tiny", route_prefix="/tiny"),
        serve.RunTarget(target=default, name="default", route_prefix="/default"),
        serve.RunTarget(target=stress, name="stress", route_prefix="/stress"),
    ])  # fmt: skip
    base = f"http://127.0.0.1:{serve_port}"
    return {
        "tiny": ServedApp("tiny", f"{base}/tiny", "tiny"),
        "default": ServedApp("default", f"{base}/default", default_model_dir.name, API_KEY),
        "stress": ServedApp("stress", f"{base}/stress", "stress"),
    }


def _stress_app(tiny_llama_dir: Path) -> Any:
    """The production app, with `tests.serve.fault_injection`'s replica in place of `LLMReplica`."""
    from unittest import mock

    import router.app
    from tests.serve.fault_injection import FaultInjectingReplica

    with mock.patch.object(router.app, "LLMReplica", FaultInjectingReplica):
        return router.app.build_app({
            "model": str(tiny_llama_dir),
            "served_model_name": "stress",
            "num_replicas": 2,
            "replica_num_cpus": 0.25,
            "ingress_num_cpus": 0.25,
            "engine": {
                "dtype": "float32",
                "kv_cache_memory_bytes": 8 * 2**20, "max_num_seqs": STRESS_MAX_NUM_SEQS, "num_threads": 1
            },
            "max_queued_requests": STRESS_MAX_QUEUED,
            "routing_stats_period_s": 0.5,
            "ingress": {"max_concurrent_requests": STRESS_MAX_CONCURRENT},
        })  # fmt: skip


@pytest.fixture(scope="session")
def tiny_app(served_apps: dict[str, ServedApp]) -> ServedApp:
    return served_apps["tiny"]


@pytest.fixture(scope="session")
def default_app(served_apps: dict[str, ServedApp]) -> ServedApp:
    return served_apps["default"]


@pytest.fixture(scope="session")
def stress_app(served_apps: dict[str, ServedApp]) -> ServedApp:
    return served_apps["stress"]


def replica_stats(app_name: str) -> dict[str, dict[str, Any]]:
    """Each `LLMReplica` of an app, asked directly for its routing stats (not through the router)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#LLMReplica#"
    names = [
        actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and actor["name"].startswith(prefix)
    ]  # fmt: skip
    refs = {name: ray.get_actor(name, namespace="serve").record_routing_stats.remote() for name in names}
    return {name: ray.get(ref, timeout=30) for name, ref in refs.items()}


def wait_until(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value: {value!r})")
        time.sleep(interval_s)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)
