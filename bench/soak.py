"""Soak: minutes of mixed load with random cancels against a served app; reports replica RSS drift and leaked KV
blocks (the goal is 0), with every response's status.

    python -m bench.soak [--minutes 10] [--users 8] [--model DIR]

It starts its own Ray head and `serve run` of deploy/config.yaml on 127.0.0.1 (bench/servers.py), with two engine
replicas, and sends a mix of completions and chat requests, streamed or not, some with n > 1; a
third of the streams are dropped at a random point and some non-streamed requests time out on purpose. RSS is
sampled every `--sample-s`; drift is the last sample minus the first one taken after the warm-up. At the end the
load stops, the replicas drain, and each must report every KV block free. Results go to bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.servers import ServeCluster, wait_until
from replicas.default_model import DEFAULT_MODEL_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORDS = ("the river city light north stone garden winter music paper engine market forest signal harbor "
         "silver orange window travel simple").split()  # fmt: skip


class Soak:
    def __init__(self, cluster: ServeCluster, variant: str, users: int, seed: int) -> None:
        self.url = cluster.url(variant)
        self.users = users
        self.rng = random.Random(seed)
        self.statuses: Counter = Counter()
        self.cancelled = 0
        self.stream_errors = 0

    def _prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(4, 120)))

    async def _one(self, client: httpx.AsyncClient) -> None:
        rng = self.rng
        chat = rng.random() < 0.5
        body: dict[str, Any] = {"max_tokens": rng.randint(1, 48), "temperature": rng.choice([0.0, 0.8]),
                                "n": rng.choice([1, 1, 1, 2])}  # fmt: skip
        if chat:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": self._prompt()}]
        else:
            path, body["prompt"] = "/v1/completions", self._prompt()
        if rng.random() < 0.6:
            body["stream"] = True
            drop_after = rng.randint(0, 20) if rng.random() < 0.33 else None
            async with client.stream("POST", path, json=body) as response:
                self.statuses[response.status_code] += 1
                if response.status_code != 200:
                    await response.aread()
                    return
                events = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and '"error"' in line:
                        self.stream_errors += 1
                    events += line.startswith("data: ")
                    if drop_after is not None and events >= drop_after:
                        self.cancelled += 1
                        return  # leaving the block closes the connection mid-stream
        else:
            timeout = rng.uniform(0.05, 2.0) if rng.random() < 0.15 else 300.0
            try:
                response = await client.post(path, json=body, timeout=timeout)
                self.statuses[response.status_code] += 1
            except httpx.TimeoutException:
                self.cancelled += 1

    async def _user(self, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=300) as client:
            while time.monotonic() < deadline:
                try:
                    await self._one(client)
                except httpx.TransportError:
                    self.statuses["transport_error"] += 1

    async def run(self, duration_s: float) -> None:
        deadline = time.monotonic() + duration_s
        await asyncio.gather(*(self._user(deadline) for _ in range(self.users)))


def _replica_stats(cluster: ServeCluster, variant: str) -> list[dict[str, Any]]:
    """Every replica of the variant (ServeCluster's own helper expects exactly one)."""
    import ray

    prefix = f"SERVE_REPLICA::{variant}#LLMReplica#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return [ray.get(ray.get_actor(name, namespace="serve").record_routing_stats.remote(), timeout=30) for name in names]


def _rss(pids: list[int]) -> dict[int, int]:
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=0.5, help="RSS drift is measured after this")
    parser.add_argument("--users", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "soak.json")
    args = parser.parse_args()

    variant = "soak"
    engine = {"kv_cache_memory_bytes": 256 * 2**20, "max_num_seqs": 16, "max_model_len": 1024, "num_threads": 1}
    log_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    cluster = ServeCluster({variant: engine}, args.model, log_dir, num_cpus=4)
    _with_two_replicas()
    started = time.monotonic()
    try:
        cluster.start()
        pids = [stats["pid"] for stats in _replica_stats(cluster, variant)]
        soak = Soak(cluster, variant, args.users, args.seed)
        samples: list[dict[str, Any]] = []

        async def sample(deadline: float) -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(args.sample_s)
                rss = _rss(pids)
                samples.append({"t_s": round(time.monotonic() - started, 1), "rss_bytes": rss})
                print(f"t={samples[-1]['t_s']:7.1f}s  rss MiB {[round(v / 2**20) for v in rss.values()]}  "
                      f"statuses {dict(soak.statuses)}  cancelled {soak.cancelled}", flush=True)  # fmt: skip

        async def both() -> None:
            duration_s = args.minutes * 60
            await asyncio.gather(soak.run(duration_s), sample(time.monotonic() + duration_s))

        load_started = time.monotonic()
        asyncio.run(both())
        # Drain: cancelled requests are aborted asynchronously; then every block must be free.
        wait_until(lambda: all(s["num_running"] + s["num_waiting"] == 0 for s in _replica_stats(cluster, variant)),
                   120, "replicas to drain")  # fmt: skip
        final = _replica_stats(cluster, variant)
        leaked = sum(s["num_total_blocks"] - s["num_free_blocks"] for s in final)
        warm = [s for s in samples if s["t_s"] - (load_started - started) >= args.warmup_minutes * 60] or samples
        drift = {str(pid): warm[-1]["rss_bytes"][pid] - warm[0]["rss_bytes"][pid] for pid in pids}
        result = {
            "minutes": args.minutes,
            "users": args.users,
            "replicas": len(pids),
            "statuses": {str(k): v for k, v in soak.statuses.items()},
            "cancelled_by_client": soak.cancelled,
            "stream_error_events": soak.stream_errors,
            "leaked_blocks": leaked,
            "total_blocks": sum(s["num_total_blocks"] for s in final),
            "requests_finished": sum(s["num_requests_finished"] for s in final),
            "rss_drift_bytes_after_warmup": drift,
            "rss_first_last_mib": {
                str(pid): [round(warm[0]["rss_bytes"][pid] / 2**20, 1), round(warm[-1]["rss_bytes"][pid] / 2**20, 1)]
                for pid in pids
            },
            "samples": [{"t_s": s["t_s"], "rss_mib": [round(v / 2**20, 1) for v in s["rss_bytes"].values()]}
                        for s in samples],  # fmt: skip
        }
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        cluster.stop()


def _with_two_replicas() -> None:
    """Two replicas of the default model instead of deploy/config.yaml's autoscaling bounds of one.

    NOTE: ServeCluster.start builds its config with bench.servers.serve_config; this wraps that function."""
    import bench.servers as servers

    make_config = servers.serve_config

    def soak_config(*args: Any, **kwargs: Any) -> dict[str, Any]:
        config = make_config(*args, **kwargs)
        for app in config["applications"]:
            app["args"]["num_replicas"] = 2
            app["args"]["replica_num_cpus"] = 1
            app.pop("deployments", None)  # num_replicas instead of the laptop autoscaling bounds
        return config

    servers.serve_config = soak_config


if __name__ == "__main__":
    main()
