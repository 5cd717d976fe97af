"""Autoscaling under a burst: engine replicas over time next to the load, on a local multi-node Ray cluster.

    python -m bench.autoscaling [--model DIR] [--quick]

Starts a head and two worker nodes on this machine (the head hosts the Serve controller, the HTTP proxy on
127.0.0.1 and the ingress; the workers host the engine replicas), deploys the app with autoscaling on ongoing
requests, then runs: a quiet lead-in, a burst of closed-loop clients, and a quiet tail. Every half second it
records the client requests in flight, completions, and the running replicas on each node. Results go to
bench/results/autoscaling.json and bench/results/autoscaling.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from replicas import OPENMP_ENV
from replicas.default_model import DEFAULT_MODEL_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
REPLICA_RESOURCE = "llm_replica"

AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 4,
    "upscale_delay_s": 2,
    "downscale_delay_s": 10,
    # Deprecated in Serve's docs, still what sets how often callers report their load (default 10 s).
    "metrics_interval_s": 1,
    "look_back_period_s": 5,
}


@dataclass
class Phases:
    lead_in_s: float = 10
    burst_s: float = 60
    tail_s: float = 60
    burst_clients: int = 16
    max_tokens: int = 32


@dataclass
class Sample:
    t: float  # seconds since the lead-in began
    in_flight: int  # client requests sent and not yet answered
    completed: int  # answered 200 so far
    failed: int  # answered otherwise so far
    replicas: int  # running engine replicas
    target_replicas: int  # the autoscaler's decision (replicas starting or stopping count toward it)
    replicas_by_node: dict[str, int] = field(default_factory=dict)  # short node id -> running replicas


@contextlib.contextmanager
def local_cluster(num_workers: int = 2, worker_cpus: int = 2) -> Iterator[str]:
    """A head (no engine replicas) and `num_workers` workers with `llm_replica` slots; yields the Serve HTTP URL."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # A private temp dir: Ray records the newest cluster's address under it, where a plain `ray.init()` elsewhere
    # on the machine would otherwise find and join this cluster.
    temp_dir = tempfile.mkdtemp(prefix="rbench", dir="/tmp")
    env = {"PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "disabled", **OPENMP_ENV,
           "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": temp_dir}  # fmt: skip
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, include_dashboard=False)  # the head
        for _ in range(num_workers):
            cluster.add_node(num_cpus=worker_cpus, resources={REPLICA_RESOURCE: 2 * worker_cpus})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


def engine_replicas(app_name: str) -> tuple[dict[str, int], int]:
    """Running engine replicas per node (short node id), and the autoscaler's target count."""
    from ray.serve.context import _get_global_client

    app = _get_global_client().get_serve_details().get("applications", {}).get(app_name)
    if app is None:
        return {}, 0
    deployment = app["deployments"]["LLMReplica"]
    counts: dict[str, int] = {}
    for replica in deployment["replicas"]:
        if replica["state"] == "RUNNING":
            counts[replica["node_id"][:8]] = counts.get(replica["node_id"][:8], 0) + 1
    return counts, deployment["target_num_replicas"]


class LoadState:
    def __init__(self) -> None:
        self.in_flight = 0
        self.completed = 0
        self.failed = 0


async def closed_loop_clients(base_url: str, state: LoadState, clients: int, duration_s: float, max_tokens: int,
                              seed: int) -> None:  # fmt: skip
    """`clients` clients, each sending its next request when the previous one is answered, for `duration_s`."""
    deadline = time.monotonic() + duration_s

    async def one_client(client: httpx.AsyncClient, rng: random.Random) -> None:
        while time.monotonic() < deadline:
            body = {"prompt": [rng.randrange(100, 49000) for _ in range(rng.randint(16, 64))],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}  # fmt: skip
            state.in_flight += 1
            try:
                response = await client.post("/v1/completions", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            state.in_flight -= 1
            state.completed += ok
            state.failed += not ok

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(300, connect=10), limits=limits) as client:
        await asyncio.gather(*(one_client(client, random.Random(seed + i)) for i in range(clients)))


def run(model: Path, phases: Phases, seed: int) -> dict[str, Any]:
    from ray import serve

    from router.app import build_app

    with local_cluster() as base_url:
        app = build_app({
            "model": str(model),
            "replica_num_cpus": 0.5,
            "replica_resources": {REPLICA_RESOURCE: 1},
            "ingress_num_cpus": 0.5,
            "engine": {"kv_cache_memory_bytes": 128 * 2**20, "max_model_len": 1024, "num_threads": 1},
            "autoscaling_config": AUTOSCALING,
        })  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # metrics_interval_s
            serve.run(app, name="llm", route_prefix="/")
        state = LoadState()
        samples: list[Sample] = []
        stop = threading.Event()
        start = time.monotonic()

        def sample_loop() -> None:
            while not stop.is_set():
                by_node, target = engine_replicas("llm")
                samples.append(Sample(round(time.monotonic() - start, 2), state.in_flight, state.completed,
                                      state.failed, sum(by_node.values()), target, by_node))  # fmt: skip
                print(f"\r{samples[-1].t:6.1f}s  in flight {state.in_flight:3d}  replicas {samples[-1].replicas}"
                      f"  completed {state.completed}", end="", flush=True)  # fmt: skip
                stop.wait(0.5)

        sampler = threading.Thread(target=sample_loop, daemon=True)
        sampler.start()
        try:
            time.sleep(phases.lead_in_s)
            burst_start = time.monotonic() - start
            asyncio.run(closed_loop_clients(base_url, state, phases.burst_clients, phases.burst_s, phases.max_tokens,
                                            seed))  # fmt: skip
            burst_end = time.monotonic() - start
            time.sleep(phases.tail_s)
        finally:
            stop.set()
            sampler.join(timeout=10)
        print()
    return summarize(samples, burst_start, burst_end, phases)


def summarize(samples: list[Sample], burst_start: float, burst_end: float, phases: Phases) -> dict[str, Any]:
    def first_time(condition: Any, after: float) -> float | None:
        return next((s.t for s in samples if s.t >= after and condition(s)), None)

    peak = max(s.replicas for s in samples)
    first_decision = first_time(lambda s: s.target_replicas > AUTOSCALING["min_replicas"], burst_start)
    first_up = first_time(lambda s: s.replicas > AUTOSCALING["min_replicas"], burst_start)
    at_peak = first_time(lambda s: s.replicas == peak, burst_start)
    down_decision = first_time(lambda s: s.target_replicas == AUTOSCALING["min_replicas"], burst_end)
    back_down = first_time(lambda s: s.replicas == AUTOSCALING["min_replicas"], burst_end)
    nodes_at_peak = next((s.replicas_by_node for s in samples if s.replicas == peak), {})
    burst_samples = [s for s in samples if burst_start <= s.t <= burst_end]
    return {
        "autoscaling_config": AUTOSCALING,
        "phases": asdict(phases),
        "burst_start_s": round(burst_start, 2),
        "burst_end_s": round(burst_end, 2),
        "peak_replicas": peak,
        "replicas_by_node_at_peak": nodes_at_peak,
        "first_upscale_decision_after_burst_start_s": None if first_decision is None else round(
            first_decision - burst_start, 1
        ),
        "first_upscale_after_burst_start_s": None if first_up is None else round(first_up - burst_start, 1),
        "peak_after_burst_start_s": None if at_peak is None else round(at_peak - burst_start, 1),
        "downscale_decision_after_burst_end_s": None if down_decision is None else round(
            down_decision - burst_end, 1
        ),
        "back_to_min_after_burst_end_s": None if back_down is None else round(back_down - burst_end, 1),
        "completed": samples[-1].completed,
        "failed": samples[-1].failed,
        "burst_throughput_rps": round(
            (burst_samples[-1].completed - burst_samples[0].completed) / max(1e-9, burst_end - burst_start), 2
        ) if len(burst_samples) > 1 else None,  # fmt: skip
        "timeline": [asdict(s) for s in samples],
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = results["timeline"]
    t = [s["t"] for s in timeline]
    fig, (load_ax, replica_ax) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    load_ax.plot(t, [s["in_flight"] for s in timeline], color="tab:blue", label="requests in flight (clients)")
    target = results["autoscaling_config"]["target_ongoing_requests"]
    load_ax.plot(t, [target * s["replicas"] for s in timeline], color="tab:gray", linestyle="--",
                 label="target_ongoing_requests x replicas")  # fmt: skip
    load_ax.set_ylabel("requests")
    load_ax.legend(loc="upper right")
    replica_ax.step(t, [s["target_replicas"] for s in timeline], where="post", color="tab:gray", linestyle="--",
                    label="target (autoscaler decision)")  # fmt: skip
    replica_ax.step(t, [s["replicas"] for s in timeline], where="post", color="tab:orange", label="running replicas")
    for node in sorted({n for s in timeline for n in s["replicas_by_node"]}):
        replica_ax.step(t, [s["replicas_by_node"].get(node, 0) for s in timeline], where="post", alpha=0.6,
                        linestyle=":", label=f"on node {node}")  # fmt: skip
    replica_ax.set_ylabel("engine replicas")
    replica_ax.set_xlabel("seconds")
    replica_ax.set_ylim(0, results["autoscaling_config"]["max_replicas"] + 0.5)
    replica_ax.legend(loc="upper right")
    for ax in (load_ax, replica_ax):
        ax.axvspan(results["burst_start_s"], results["burst_end_s"], color="tab:red", alpha=0.08)
    load_ax.set_title("Autoscaling on ongoing requests: a burst (shaded) on a 3-node local Ray cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--quick", action="store_true", help="a shorter burst and tail (about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    phases = Phases(lead_in_s=5, burst_s=25, tail_s=35, burst_clients=12) if args.quick else Phases()
    results = run(args.model, phases, args.seed)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "autoscaling.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS_DIR / "autoscaling.png")
    summary = {k: v for k, v in results.items() if k != "timeline"}
    print(json.dumps(summary, indent=2))
    print(f"wrote {RESULTS_DIR / 'autoscaling.json'} and {RESULTS_DIR / 'autoscaling.png'}")


if __name__ == "__main__":
    main()
