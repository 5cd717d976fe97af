"""A local multi-node Ray cluster for this package: a head and two worker nodes, three raylets on this machine.

- The head carries the Serve controller, the HTTP proxy (`HeadOnly`: every node here shares one IP, so proxies on
  every node would fight over the port) and room for ingresses; it advertises no `llm_replica` resource, so no
  engine replica lands there and losing a worker never takes the HTTP entry point with it.
- Each worker advertises `llm_replica` slots: engine replicas ask for one (`replica_resources`), so they spread
  over the workers (Serve's SPREAD strategy) and a lost worker's replicas come back on the other one.

Ray is one per process. This package starts its own cluster and shuts it down fully before the rest of the suite
(tests/serve starts a single-node Ray at first use); `pytest_collection_modifyitems` runs this package first
whatever order the paths were given in. Tests here run in file order and the node-loss test, which removes a
worker for good, is the last one.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from replicas import OPENMP_ENV

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
REPLICA_RESOURCE = "llm_replica"
WORKER_CPUS = 2  # logical: four 0.5-CPU replicas per worker
WORKER_REPLICA_SLOTS = 4
TINY_MAX_NUM_SEQS = 4

# The environment every node (and so every worker process) inherits.
NODE_ENV = {
    "PYTHONPATH": str(REPO_ROOT),
    "RAY_AUTH_MODE": "disabled",  # local test clusters; production configs leave token auth on
    **OPENMP_ENV,
    "TOKENIZERS_PARALLELISM": "false",
}
# NOTE: a lost node is declared dead after about period x threshold (defaults: 3 s x 5 after a 5 s delay); the
# node-loss test waits for that. Not lower: on a loaded 2-core machine a live raylet can be slow to answer.
HEAD_SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 3000,
    "health_check_failure_threshold": 4,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """This package's tests first: its cluster must be up and gone before any other Ray in this process."""
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(str(item.fspath)).parents]
    if ours:
        items[:] = ours + [item for item in items if item not in ours]


@dataclass
class LocalCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    http_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def worker_nodes(self) -> dict[str, Any]:
        """Live worker nodes by node id (hex)."""
        return {node.node_id: node for node in self.cluster.worker_nodes}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="package")
def local_cluster() -> Iterator[LocalCluster]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        # Only when this package's ordering hook was bypassed (e.g. another plugin reordered the tests).
        logger.warning("a Ray instance is already up in this process: shutting it down for the cluster tests")
        serve.shutdown()
        ray.shutdown()
    saved_env = {name: os.environ.get(name) for name in (*NODE_ENV, "RAY_TMPDIR")}
    # NOTE: a short private temp dir (raylet socket paths have a length limit). Ray writes the address of the
    # newest cluster to <temp dir>/ray/ray_current_cluster, and a plain `ray.init()` anywhere on the machine
    # connects to that address: in the shared /tmp/ray it would capture other processes' Ray sessions.
    temp_dir = tempfile.mkdtemp(prefix="rcl", dir="/tmp")
    # NOTE: the nodes take Ray's default node IP (this machine's address), not 127.0.0.1: Ray 2.60 rewrites a
    # loopback cluster address to that IP when connecting (`resolve_ip_for_localhost`), and a GCS bound to
    # 127.0.0.1 is then unreachable. HTTP (the Serve proxy) still binds 127.0.0.1 only.
    os.environ.update(NODE_ENV, RAY_TMPDIR=temp_dir)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, include_dashboard=False, _system_config=HEAD_SYSTEM_CONFIG)  # the head
        for _ in range(2):
            cluster.add_node(num_cpus=WORKER_CPUS, resources={REPLICA_RESOURCE: WORKER_REPLICA_SLOTS})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        http_port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
        yield LocalCluster(cluster, http_port)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            shutil.rmtree(temp_dir, ignore_errors=True)


def tiny_app_args(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """`AppArgs` for the tiny seeded Llama: 0.5-CPU replicas that need a worker's `llm_replica` slot."""
    return {
        "model": str(model_dir),
        "served_model_name": "tiny",
        "replica_num_cpus": 0.5,
        "replica_resources": {REPLICA_RESOURCE: 1},
        "ingress_num_cpus": 0.25,
        "engine": {
            "dtype": "float32", "kv_cache_memory_bytes": 8 * 2**20, "max_num_seqs": TINY_MAX_NUM_SEQS, "num_threads": 1
        },
        "max_queued_requests": 64,
        "routing_stats_period_s": 0.5,
        **overrides,
    }


# --- what Serve reports about an application's replicas ---------------------------------------------------------


def deployment_replicas(app_name: str, deployment: str = "LLMReplica") -> list[dict[str, Any]]:
    """The deployment's replicas as the controller reports them (replica_id, state, node_id, actor_name, ...)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details.get("applications", {}).get(app_name)
    if app is None or deployment not in app["deployments"]:
        return []
    return list(app["deployments"][deployment]["replicas"])


def running_replicas(app_name: str, deployment: str = "LLMReplica") -> list[dict[str, Any]]:
    return [r for r in deployment_replicas(app_name, deployment) if r["state"] == "RUNNING"]


def replica_nodes(app_name: str, deployment: str = "LLMReplica") -> dict[str, str]:
    """Running replica actor name -> node id."""
    return {r["actor_name"]: r["node_id"] for r in running_replicas(app_name, deployment)}


def finished_by_replica(app_name: str) -> dict[str, int]:
    """Running engine replica actor name -> requests it has finished (asked directly, not through the router)."""
    import ray

    refs = {
        name: ray.get_actor(name, namespace="serve").record_routing_stats.remote()
        for name in replica_nodes(app_name)
    }  # fmt: skip
    return {name: ray.get(ref, timeout=30)["num_requests_finished"] for name, ref in refs.items()}


# --- the applications under test ---------------------------------------------------------------------------------

# Short delays and a target of one ongoing request per replica: a burst of a few clients scales up within seconds.
# `metrics_interval_s` is deprecated in Serve's docs but is still what sets how often callers and replicas report.
BURST_AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 2,  # one more replica shows the scale-up; a third would only cost start-up time on 2 cores
    "target_ongoing_requests": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
}


@dataclass
class ClusterApps:
    spread: str  # base URL: two fixed replicas, one per worker
    autoscale: str  # base URL: 1-2 replicas, autoscaled on ongoing requests


@pytest.fixture(scope="package")
def cluster_apps(local_cluster: LocalCluster, tiny_llama_dir: Path) -> ClusterApps:
    """Both apps deployed together, so their replicas start in parallel (most of this package's set-up time)."""
    import warnings

    from ray import serve

    from router.app import build_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # metrics_interval_s: see BURST_AUTOSCALING
        spread = build_app(tiny_app_args(tiny_llama_dir, num_replicas=2))
        autoscale = build_app(tiny_app_args(tiny_llama_dir, autoscaling_config=BURST_AUTOSCALING))
        serve.run_many([
            serve.RunTarget(target=spread, name="spread", route_prefix="/spread"),
            serve.RunTarget(target=autoscale, name="autoscale", route_prefix="/autoscale"),
        ])  # fmt: skip
    return ClusterApps(spread=f"{local_cluster.base_url}/spread", autoscale=f"{local_cluster.base_url}/autoscale")
