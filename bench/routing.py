"""Routing quality, measured: the same seeded chat workload through each request router, on 2 and 4 replicas.

``python -m bench.routing`` (all routers × 2 and 4 replicas, ~30 min idle); ``--quick`` (2 replicas, short runs);
``--replicas 4 --routers ours pow2 --requests-per-user 8`` for a part; ``--repeats 3`` runs each router three times
(workload seeds differing, routers interleaved) and pools the runs into one row, for a p99 that two requests do not
decide. Results: bench/results/routing.json, .md (the
table README.md's "Routing quality" shows) and .png; a `--quick` run's as routing_quick.* (not committed).

Workload (seeded, `chat_sessions`): users hold multi-turn chats under one shared system prompt; every turn sends
the whole conversation so far (the previous answers included) plus a new user message, after a think time; a
share of the requests (`one_off_share`) are one-off prompts sharing nothing; users join evenly over the first
`ramp_s` (10 s). Each goes to `/v1/chat/completions`,
streamed, so the time to the first content token is measured by the client. Enough users per replica to keep
every replica's batch full (saturation), so routing has a load-balancing cost as well as a cache benefit. Every
user sends the same number of requests under every router (not: for a fixed time), so each router serves the same
requests and their hit rates compare (a faster router would otherwise reach later, longer turns). Each request's
(kind, start, TTFT) is kept in the JSON; `PAGED_SERVE_ROUTING_TRACE=<path prefix>` makes our router log every
decision (router/request_router.py).

Deployment: one Ray on 127.0.0.1 in this process, the app of router/app.py with a small engine per replica (one
torch thread, `--kv-mib` of KV cache, `--max-num-seqs` slots), deployed afresh for every router (a new app name:
cold caches, its own metric series), then deleted. Routers (`AppArgs.request_router`):
- ours: `router.request_router:KVAwareRequestRouter` (the default);
- pow2: Serve's default, `ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter`;
- prefix: Ray Serve LLM's `PrefixCacheAffinityRouter`, as `router.baseline_routers:TokenPrefixCacheAffinityRouter`.
  It reads `prompt` from the first positional argument of the replica call; our ingress calls
  `LLMReplica.generate(request_id=..., prompt_token_ids=..., ...)` with keywords only, so the subclass gives it a
  stand-in argument whose `prompt` is the token ids, one character per token: its character prefix tree is then a
  token prefix tree (the ingress is unchanged; see router/baseline_routers.py);
- rr: round robin, `router.baseline_routers:RoundRobinRequestRouter` (the floor).

Figures per router: prefix-cache hit rate (hit / looked-up prompt tokens, from the replicas' own engine counters,
`record_routing_stats`), TTFT p50/p99 and output tokens/s (client side), load imbalance (max / mean of each
replica's running + waiting requests, sampled every 0.5 s, over samples where the mean is at least half the
replica's slots: at saturation), and for ours the tokens it predicted the chosen replica held
(`paged_serve_router_routing_predicted_hit_tokens`, scraped from Ray's metrics endpoint) next to the actual hits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only Ray for the benchmark
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

from bench.loadgen import StreamError, percentile, sse_events, word_vocabulary  # noqa: E402
from bench.machine import machine_description  # noqa: E402
from bench.servers import Poller, free_port  # noqa: E402
from replicas import OPENMP_ENV  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
ROUTERS = {
    "ours": "router.request_router:KVAwareRequestRouter",
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    "prefix": "router.baseline_routers:TokenPrefixCacheAffinityRouter",
    "rr": "router.baseline_routers:RoundRobinRequestRouter",
}
PREDICTED_METRIC = "ray_paged_serve_router_routing_predicted_hit_tokens_total"


# --- the workload -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The seeded chat workload's shape (words are about one token each)."""

    seed: int = 0
    system_words: int = 160
    user_words: tuple[int, int] = (16, 48)
    one_off_words: tuple[int, int] = (96, 256)
    output_tokens: tuple[int, int] = (16, 32)
    turns: int = 6  # per conversation; then the user starts a new one
    think_s: float = 1.0  # mean of the exponential think time between a user's turns
    one_off_share: float = 0.2
    # Users join evenly over the first `ramp_s` seconds (a load generator's spawn rate): a run that opened with every
    # user's first prompt at once would put that burst's queueing (the same under every router) in the TTFT tail.
    ramp_s: float = 10.0


def words_text(rng: random.Random, words: list[str], count: tuple[int, int]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(*count)))


class ChatUser:
    """One user's seeded request sequence: chat turns (the answers appended as they come) and one-off prompts."""

    def __init__(self, workload: Workload, words: list[str], system: str, user_index: int, join_s: float = 0.0) -> None:
        self.workload = workload
        self.join_s = join_s  # when the user sends its first request, from the start of the run
        self.words = words
        self.system = system
        self.rng = random.Random(workload.seed * 1_000_003 + user_index)
        self.messages: list[dict[str, str]] = []

    def next_request(self) -> tuple[str, list[dict[str, str]], int]:
        """(kind, messages, max_tokens) of the user's next request."""
        max_tokens = self.rng.randint(*self.workload.output_tokens)
        if self.rng.random() < self.workload.one_off_share:
            return "one_off", [{"role": "user", "content": words_text(self.rng, self.words,
                                                                      self.workload.one_off_words)}], max_tokens
        if not self.messages or len(self.messages) >= 1 + 2 * self.workload.turns:
            self.messages = [{"role": "system", "content": self.system}]  # a new conversation
        self.messages.append({"role": "user", "content": words_text(self.rng, self.words, self.workload.user_words)})
        return "chat", list(self.messages), max_tokens

    def answered(self, kind: str, text: str) -> None:
        if kind == "chat":
            self.messages.append({"role": "assistant", "content": text})

    def think_s(self) -> float:
        return self.rng.expovariate(1.0 / self.workload.think_s) if self.workload.think_s > 0 else 0.0


# --- one run ------------------------------------------------------------------------------------------------------


@dataclass
class Record:
    kind: str
    start: float
    ttft: float | None = None
    end: float | None = None
    completion_tokens: int = 0
    error: str | None = None


async def chat(client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, str]], max_tokens: int,
               record: Record, t0: float) -> str:  # fmt: skip
    """One streamed chat completion; fills `record`; the answer's text."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    parts: list[str] = []
    async for event in sse_events(client, url, body):
        if event.get("usage"):
            record.completion_tokens = event["usage"].get("completion_tokens", 0)
        for choice in event.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                if record.ttft is None:
                    record.ttft = time.perf_counter() - t0 - record.start
                parts.append(content)
    record.end = time.perf_counter() - t0
    return "".join(parts)


async def drive(url: str, model: str, users: list[ChatUser], requests_per_user: int) -> tuple[list[Record], float]:
    """Every user joins at its place in the ramp and sends `requests_per_user` requests back to back (with think
    time); the records and the seconds from the start to the last answer."""
    t0 = time.perf_counter()
    records: list[Record] = []

    async def user_loop(user: ChatUser, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(user.join_s)
        for _ in range(requests_per_user):
            kind, messages, max_tokens = user.next_request()
            record = Record(kind, time.perf_counter() - t0)
            records.append(record)
            try:
                text = await chat(client, url, model, messages, max_tokens, record, t0)
            except (httpx.HTTPError, StreamError) as error:
                record.error = repr(error)
                text = ""
            user.answered(kind, text)
            await asyncio.sleep(user.think_s())

    limits = httpx.Limits(max_connections=len(users) + 4, max_keepalive_connections=len(users) + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(user_loop(user, client) for user in users))
    ends = [record.end for record in records if record.end is not None]
    return records, max(ends, default=time.perf_counter() - t0)


def imbalance(samples: list[list[int]], slots: int) -> tuple[float, int]:
    """Mean of max/mean ongoing requests per replica over the samples at saturation, and how many there were."""
    ratios = [max(s) / statistics.mean(s) for s in samples if s and statistics.mean(s) >= slots / 2]
    return (statistics.mean(ratios) if ratios else math.nan), len(ratios)


# --- Ray, Serve and the replicas -----------------------------------------------------------------------------------


def start_ray(num_cpus: int) -> tuple[int, int]:
    """A local Ray (loopback, no dashboard, metrics exported every second) and Serve; (HTTP port, metrics port)."""
    import ray
    from ray import serve

    metrics_port = free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), **OPENMP_ENV,
                                       "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                       **({"PAGED_SERVE_ROUTING_TRACE": os.environ["PAGED_SERVE_ROUTING_TRACE"]}
                                          if "PAGED_SERVE_ROUTING_TRACE" in os.environ else {})}},
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    return http_port, metrics_port


def replica_actors(app_name: str) -> list[Any]:
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#LLMReplica#"
    names = sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                   if actor["namespace"] == "serve" and actor["name"].startswith(prefix))  # fmt: skip
    return [ray.get_actor(name, namespace="serve") for name in names]


def stats_of(replicas: list[Any]) -> list[dict[str, Any]]:
    import ray

    return ray.get([replica.record_routing_stats.remote() for replica in replicas], timeout=30)


def predicted_hit_tokens(metrics_port: int, app_name: str) -> float:
    """Our router's predicted-hit counter for the app, as Ray exports it (0 before its first export)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    pattern = re.compile(rf'^{PREDICTED_METRIC}\{{[^}}]*application="{re.escape(app_name)}"[^}}]*\}} (\S+)$', re.M)
    return sum(float(value) for value in pattern.findall(text))


def settled(read: Any, timeout_s: float = 20.0, interval_s: float = 1.5) -> float:
    """`read()` once two readings `interval_s` apart agree (the exporter has caught up), or the last at the deadline."""
    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        value = read()
        if value == last and value > 0:
            return value
        last = value
    return last


@dataclass
class Deployment:
    """What every router's app is deployed with."""

    model: str
    replicas: int
    max_num_seqs: int = 4
    kv_mib: int = 256
    max_model_len: int = 2048

    def app_args(self, router_class: str, router_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "model": self.model,
            "served_model_name": "bench",
            "num_replicas": self.replicas,
            "replica_num_cpus": 0.5,  # logical: placement only; each engine runs one torch thread
            "ingress_num_cpus": 0.25,
            "engine": {"kv_cache_memory_bytes": self.kv_mib * 2**20, "max_num_seqs": self.max_num_seqs,
                       "max_model_len": self.max_model_len, "num_threads": 1},  # fmt: skip
            "max_queued_requests": 1024,  # the clients are closed-loop: never refuse one of them
            "routing_stats_period_s": 0.5,
            "request_router": router_class,
            "router": router_kwargs or {},
        }


@dataclass
class RouterResult:
    router: str
    router_class: str
    replicas: int
    users: int
    requests: int
    errors: int
    hit_rate: float
    hit_tokens: int
    prompt_tokens: int
    ttft_p50_s: float
    ttft_p99_s: float
    output_tok_s: float
    imbalance: float
    imbalance_samples: int
    predicted_hit_tokens: float | None = None
    imported_tokens: int = 0  # of the hits, tokens a replica fetched from another (replicas/kv_transfer.py)
    per_replica_prompt_tokens: list[int] = field(default_factory=list)
    ttfts: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, start s, TTFT s) of each answer
    ttft_p99_runs_s: list[float] = field(default_factory=list)  # each run's own p99, when runs were pooled
    seeds: list[int] = field(default_factory=list)  # the workload seed of each run


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One router's runs (same deployment, workload seeds differing) as one result: tokens, requests and TTFTs
    summed over the runs, so the p99 of 3 x 200 requests is decided by six requests, not two; throughput and
    imbalance are the runs' means."""
    if len(runs) == 1:
        return runs[0]
    ttfts = [entry for run in runs for entry in run["ttfts"]]
    values = [ttft for _, _, ttft in ttfts]
    hits, prompts = sum(run["hit_tokens"] for run in runs), sum(run["prompt_tokens"] for run in runs)
    ratios = [run["imbalance"] for run in runs if not math.isnan(run["imbalance"])]
    predicted = [run["predicted_hit_tokens"] for run in runs]
    return {
        **runs[0], "requests": sum(run["requests"] for run in runs), "errors": sum(run["errors"] for run in runs),
        "hit_rate": hits / max(1, prompts), "hit_tokens": hits, "prompt_tokens": prompts,
        "ttft_p50_s": percentile(values, 0.5), "ttft_p99_s": percentile(values, 0.99),
        "output_tok_s": statistics.mean(run["output_tok_s"] for run in runs),
        "imbalance": statistics.mean(ratios) if ratios else math.nan,
        "imbalance_samples": sum(run["imbalance_samples"] for run in runs),
        "predicted_hit_tokens": None if None in predicted else sum(predicted),
        "imported_tokens": sum(run.get("imported_tokens", 0) for run in runs),
        "per_replica_prompt_tokens": [sum(t) for t in zip(*(run["per_replica_prompt_tokens"] for run in runs))],
        "ttfts": ttfts, "ttft_p99_runs_s": [p for run in runs for p in run["ttft_p99_runs_s"]],
        "seeds": [seed for run in runs for seed in run["seeds"]],
    }  # fmt: skip


def run_router(name: str, deployment: Deployment, workload: Workload, words: list[str], users: int,
               requests_per_user: int, http_port: int, metrics_port: int,
               router_kwargs: dict[str, Any] | None = None) -> RouterResult:  # fmt: skip
    """Deploy the app with router `name`, drive the workload through it, collect the figures, delete the app."""
    from ray import serve

    from router.app import build_app

    app_name = f"routing-{name}-{deployment.replicas}-s{workload.seed}"  # its own metric series per run
    app = build_app(deployment.app_args(ROUTERS[name], router_kwargs))
    serve.run(app, name=app_name, route_prefix=f"/{app_name}")
    url = f"http://127.0.0.1:{http_port}/{app_name}/v1/chat/completions"
    try:
        ready = httpx.post(url, json={"model": "bench", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 1}, timeout=300)  # fmt: skip
        ready.raise_for_status()
        replicas = replica_actors(app_name)
        before = stats_of(replicas)
        system = words_text(random.Random(workload.seed), words, (workload.system_words, workload.system_words))
        joins = [workload.ramp_s * index / users for index in range(users)]
        chat_users = [ChatUser(workload, words, system, index, join_s) for index, join_s in enumerate(joins)]
        # Each replica's running + waiting requests, every 0.5 s while the load runs.
        with Poller(lambda: [s["num_running"] + s["num_waiting"] for s in stats_of(replicas)]) as sampler:
            records, elapsed_s = asyncio.run(drive(url, "bench", chat_users, requests_per_user))
        after = stats_of(replicas)
        queried = [a["prefix_cache_queries"] - b["prefix_cache_queries"] for a, b in zip(after, before)]
        hits = sum(a["prefix_cache_hits"] - b["prefix_cache_hits"] for a, b in zip(after, before))
        imported = sum(a.get("num_imported_tokens", 0) - b.get("num_imported_tokens", 0) for a, b in zip(after, before))
        ttfts = [r.ttft for r in records if r.ttft is not None and r.error is None]
        ratio, num_samples = imbalance(sampler.samples, deployment.max_num_seqs)
        p99 = percentile(ttfts, 0.99)
        predicted = settled(lambda: predicted_hit_tokens(metrics_port, app_name)) if name == "ours" else None
        return RouterResult(
            router=name, router_class=ROUTERS[name], replicas=deployment.replicas, users=users,
            requests=len(records), errors=sum(r.error is not None for r in records),
            hit_rate=hits / max(1, sum(queried)), hit_tokens=hits, prompt_tokens=sum(queried),
            ttft_p50_s=percentile(ttfts, 0.5), ttft_p99_s=p99,
            output_tok_s=sum(r.completion_tokens for r in records if r.error is None) / elapsed_s,
            imbalance=ratio, imbalance_samples=num_samples, predicted_hit_tokens=predicted, imported_tokens=imported,
            per_replica_prompt_tokens=queried, ttft_p99_runs_s=[p99], seeds=[workload.seed],
            ttfts=[(r.kind, round(r.start, 3), round(r.ttft, 3)) for r in records
                   if r.ttft is not None and r.error is None],
        )  # fmt: skip
    finally:
        serve.delete(app_name)


# --- the report -----------------------------------------------------------------------------------------------------


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as the table README.md's "Routing quality" section shows."""
    lines = ["| replicas | router | hit rate (fetched) | TTFT p50 (s) | TTFT p99 (s) | output tok/s | imbalance | "
             "predicted / actual hit tokens | requests (errors) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        predicted = r["predicted_hit_tokens"]
        predicted = "—" if predicted is None else f"{predicted:.0f} / {r['hit_tokens']}"
        fetched = r.get("imported_tokens", 0) / max(1, r.get("prompt_tokens", 0))
        hit_rate = f"{r['hit_rate']:.1%} ({fetched:.1%})" if fetched else f"{r['hit_rate']:.1%}"
        lines.append(f"| {r['replicas']} | {r['router']} | {hit_rate} | {r['ttft_p50_s']:.2f} | "
                     f"{r['ttft_p99_s']:.2f} | {r['output_tok_s']:.1f} | {r['imbalance']:.2f} | {predicted} | "
                     f"{r['requests']} ({r['errors']}) |")  # fmt: skip
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    """Issue #18's targets per replica count: ours has the highest hit rate, TTFT p99 ≤ pow2's, imbalance ≤ 1.5."""
    verdicts = []
    for replicas in sorted({r["replicas"] for r in results}):
        by_router = {r["router"]: r for r in results if r["replicas"] == replicas}
        ours = by_router.get("ours")
        if ours is None:
            continue
        others = [r for name, r in by_router.items() if name != "ours"]
        best_other = max((r["hit_rate"] for r in others), default=0.0)
        verdicts.append(f"{replicas} replicas: hit rate {ours['hit_rate']:.1%} vs best other {best_other:.1%}: "
                        f"{'met' if ours['hit_rate'] >= best_other else 'MISSED'}")  # fmt: skip
        if "pow2" in by_router:
            pow2 = by_router["pow2"]["ttft_p99_s"]
            verdicts.append(f"{replicas} replicas: TTFT p99 {ours['ttft_p99_s']:.2f}s vs pow2 {pow2:.2f}s: "
                            f"{'met' if ours['ttft_p99_s'] <= pow2 else 'MISSED'}")  # fmt: skip
        ratio = ours["imbalance"]
        verdict = "no samples at saturation" if math.isnan(ratio) else "met" if ratio <= 1.5 else "MISSED"
        verdicts.append(f"{replicas} replicas: imbalance {ratio:.2f} (≤ 1.5): {verdict}")
    return verdicts


def pooled_note(meta: dict[str, Any]) -> str:
    repeats = meta.get("repeats", 1)
    return "" if repeats == 1 else f", {repeats} runs per row (workload seeds differing) pooled"


def report_markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    return "\n".join([
        f"Routing benchmark, {meta['date']}, on {meta['machine']}; model {meta['model']}; "
        f"{meta['users_per_replica']} users per replica, {meta['requests_per_user']} requests each"
        f"{pooled_note(meta)}"
        f"{' (--quick)' if meta['quick'] else ''}.", "", markdown_table(results), "",
        *[f"- {verdict}" for verdict in targets(results)],
    ]) + "\n"  # fmt: skip


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Hit rate and TTFT p99 per router, one group of bars per replica count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routers = list(dict.fromkeys(r["router"] for r in results))
    counts = sorted({r["replicas"] for r in results})
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(routers))
    for index, router in enumerate(routers):
        by_count = {r["replicas"]: r for r in results if r["router"] == router}
        xs = [position + index * width for position in range(len(counts))]
        axes[0].bar(xs, [by_count[c]["hit_rate"] if c in by_count else 0 for c in counts], width, label=router)
        axes[1].bar(xs, [by_count[c]["ttft_p99_s"] if c in by_count else 0 for c in counts], width, label=router)
    for axis, title in zip(axes, ("prefix-cache hit rate", "TTFT p99 (s)")):
        axis.set_xticks([position + width * (len(routers) - 1) / 2 for position in range(len(counts))])
        axis.set_xticklabels([f"{count} replicas" for count in counts])
        axis.set_title(title)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- main -----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 replicas, 6 requests per user")
    parser.add_argument("--replicas", type=int, nargs="+", default=None, help="replica counts (default: 2 4)")
    parser.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS))
    parser.add_argument("--requests-per-user", type=int, default=None, help="per router (default 10; quick 6)")
    parser.add_argument("--users-per-replica", type=int, default=5)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--kv-mib", type=int, default=256, help="KV cache per replica, MiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per router and replica count (workload seeds seed, seed+1, ...; routers "
                             "interleaved), pooled into one row: a steadier p99")
    parser.add_argument("--ours-kwargs", type=json.loads, default={},
                        help='JSON of KVAwareRequestRouter.initialize_state kwargs, e.g. \'{"max_imbalance": 2}\'')
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where routing[_quick].json/.md/.png go")
    args = parser.parse_args()
    replica_counts = args.replicas or ([2] if args.quick else [2, 4])
    requests_per_user = args.requests_per_user or (6 if args.quick else 10)

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)  # this process only tokenizes and drives HTTP; the engines have their own threads
    words = word_vocabulary(AutoTokenizer.from_pretrained(args.model))
    machine = machine_description()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
            "model": Path(args.model).resolve().name, "quick": args.quick, "requests_per_user": requests_per_user,
            "users_per_replica": args.users_per_replica, "workload": asdict(Workload(seed=args.seed)),
            "max_num_seqs": args.max_num_seqs, "kv_mib": args.kv_mib, "ours_kwargs": args.ours_kwargs,
            "repeats": args.repeats}  # fmt: skip
    print(f"machine: {machine}\nmodel: {meta['model']}", flush=True)
    http_port, metrics_port = start_ray(num_cpus=max(8, 2 * max(replica_counts)))
    results: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for replicas in replica_counts:
            deployment = Deployment(args.model, replicas, args.max_num_seqs, args.kv_mib)
            runs: dict[str, list[dict[str, Any]]] = {router: [] for router in args.routers}
            for repeat in range(args.repeats):  # routers interleaved: a drift in the machine hits them alike
                workload = Workload(seed=args.seed + repeat)
                for router in args.routers:
                    result = run_router(router, deployment, workload, words, args.users_per_replica * replicas,
                                        requests_per_user, http_port, metrics_port,
                                        args.ours_kwargs if router == "ours" else None)  # fmt: skip
                    runs[router].append(asdict(result))
                    print(f"run {repeat + 1}/{args.repeats}:", markdown_table(runs[router][-1:]).splitlines()[-1],
                          flush=True)  # fmt: skip
            results += [pooled(router_runs) for router_runs in runs.values()]
            if args.repeats > 1:
                print(markdown_table(results[-len(runs):]), flush=True)
    finally:
        from ray import serve

        serve.shutdown()
        import ray

        ray.shutdown()
    stem = "routing_quick" if args.quick else "routing"  # a smoke run never replaces the full run's figures
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    markdown = report_markdown(meta, results)
    (args.out / f"{stem}.md").write_text(markdown)
    plot(results, args.out / f"{stem}.png")
    print(markdown)


if __name__ == "__main__":
    main()
