"""The seed's comparison, measured over HTTP: naive Flask, static batching, and this system through Ray Serve with
contiguous KV reservation, paged KV, and paged KV with prefix caching.

    python -m bench.serving [--quick] [--price-per-hour 0.10] [--systems naive,static,paged,...]

Starts and stops every server itself on 127.0.0.1 (the baselines as subprocesses; this system with `serve run` of
deploy/config.yaml's application, once per variant, on a Ray head of its own), drives each with closed-loop users
(bench/loadgen.py: streamed `/generate` requests back to back, seeded workloads), and writes JSON, a Markdown
table and PNG plots to bench/results/ (`serving.*`, or `serving_quick.*` with --quick).

Workloads: `mixed` (prompts of 32-256 tokens, 64-128 output tokens, greedy, EOS ignored) at every concurrency
level for every system; `shared_prefix` (a 512-token system prompt + 16-64-token questions) on paged KV with
prefix caching off and on; `parallel_sampling` (n=4, temperature 1) on paged and contiguous KV. --quick uses
16-32 output tokens, fewer levels and shorter windows (a smoke run, not the comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from bench.loadgen import (
    LevelResult,
    RequestSpec,
    mixed_workload,
    parallel_sampling_workload,
    request_cycle,
    run_level,
    shared_prefix_workload,
    word_vocabulary,
)
from bench.machine import machine_description
from bench.offline import flops_per_token, measure_gemm_peak
from bench.servers import BaselineServer, Poller, ServeCluster
from replicas.default_model import DEFAULT_MODEL_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GiB = 1024**3
RSS_OVERHEAD_BYTES = int(1.5 * GiB)  # the allowance on top of weights + KV budget

LABELS = {
    "naive": "naive (Flask + HF pipeline, one request at a time)",
    "static": "static batching (8 requests, 100 ms window, padded)",
    "contiguous": "continuous batching, contiguous KV (max_model_len reserved)",
    "paged": "continuous batching, paged KV",
    "paged-prefix": "continuous batching, paged KV + prefix caching",
}
SERVE_VARIANTS = ("paged", "paged-prefix", "contiguous")
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    # NOTE: max_model_len 2048 for all (the model allows 8192): prompts here stay under 600 tokens, and with the
    # model's full context the contiguous mode could reserve only 2 sequences in 1 GiB; 2048 is kind to it.
    "paged": {"enable_prefix_caching": False},
    "paged-prefix": {"enable_prefix_caching": True},
    "contiguous": {"kv_allocation": "contiguous", "enable_prefix_caching": False},
}


@dataclass(frozen=True)
class Mode:
    name: str
    levels: tuple[int, ...]
    duration_s: float
    drain_s: float  # this system: long enough for the requests in flight at the end of a level to finish
    baseline_drain_s: float  # the baselines' queues never drain: only the request or batch being served finishes
    output_len: tuple[int, int]
    shared_users: int
    parallel_users: int
    latency_bound_s: float
    headline_users: int  # throughput is compared here
    latency_users: int  # average / p99 latency and TTFT are compared here
    # This system's warm-up ends once as many requests as users have completed (at most `warmup_s`): by then the
    # users' requests no longer start and finish in step. The baselines serve one request or batch at a time
    # from the first second on; their warm-up ends with their first answer, so that the window starts at the end
    # of a burst (a static batch of 8 takes ~16 s here: a window starting mid-batch may hold one burst only).
    warmup_s: float = 80.0
    # A static batch answers every ~16 s here and the baselines' windows start at an answer, so any window holds
    # one interval between answers: a longer one would measure no more (naive: ~17 tok/s, a few hundred tokens).
    baseline_duration_s: float = 20.0
    contiguous_levels: tuple[int, ...] = ()  # the contiguous-KV sweep (it serves few sequences; each level is long)


FULL = Mode("full", (1, 8, 32, 50, 64, 128), 30.0, 60.0, 90.0, (64, 128), 32, 8, 60.0, 64, 50,
            contiguous_levels=(64,))  # fmt: skip
QUICK = Mode("quick", (8,), 6.0, 15.0, 30.0, (16, 32), 8, 4, 15.0, 8, 8, warmup_s=8.0, baseline_duration_s=6.0,
             contiguous_levels=(8,))  # fmt: skip


@dataclass
class Plan:
    mode: Mode
    systems: list[str]
    model: Path
    threads: int
    price_per_hour: float
    seed: int
    output_dir: Path
    workloads: dict[str, list[RequestSpec]] = field(default_factory=dict)


# --- measurement ----------------------------------------------------------------------------------------------


def kv_sampler(cluster: ServeCluster, variant: str, period_s: float = 0.5) -> Poller[dict[str, Any]]:
    """Polls a Serve replica's stats every `period_s` on a thread: KV usage and slot efficiency over time."""

    def sample() -> dict[str, Any]:
        stats = cluster.replica_stats(variant)
        total = stats["num_total_blocks"] or 1
        allocated = stats["kv_slots_allocated"]
        return {
            "t": time.time(),
            "kv_usage": 1 - stats["num_free_blocks"] / total,
            "kv_memory_efficiency": stats["kv_slots_live"] / allocated if allocated else None,
            "num_running": stats["num_running"],
            "num_waiting": stats["num_waiting"],
        }

    return Poller(sample, period_s)


def kv_summary(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """KV statistics of the samples taken in [start, end] while sequences were running."""
    busy = [s for s in samples if start <= s["t"] <= end and s["num_running"] > 0]
    efficiency = [s["kv_memory_efficiency"] for s in busy if s["kv_memory_efficiency"] is not None]
    return {
        "kv_memory_efficiency": statistics.mean(efficiency) if efficiency else None,
        "kv_usage_mean": statistics.mean(s["kv_usage"] for s in busy) if busy else None,
        "kv_usage_peak": max((s["kv_usage"] for s in busy), default=None),
        "max_running": max((s["num_running"] for s in busy), default=0),
    }


def level_record(result: LevelResult, flops_per_tok: float, price_per_hour: float) -> dict:
    """The load generator's summary plus achieved FLOP/s, cost and the latencies for the CDF plot."""
    summary = result.summary()
    start, end = result.window
    # Prefill work: the prompts whose first token arrived in the window (the prefill finished there).
    prefilled = sum(r.prompt_tokens for r in result.records if r.first_token is not None and start <= r.first_token <= end)
    tok_s = summary["tok_per_s"]
    prefill_per_s = prefilled / result.duration_s
    achieved = (prefill_per_s + tok_s) * flops_per_tok
    summary.update({
        "prefill_tokens_per_s": prefill_per_s,  # prompt tokens, cached ones included (see `discount_prefix_hits`)
        "achieved_gflops": achieved / 1e9,
        "cost_per_1m_tokens": price_per_hour / (tok_s * 3600) * 1e6 if tok_s > 0 else math.inf,
        "started_at": result.started_at,
        # A request cut off had been followed at least this long: a censored latency is greater than it.
        "followed_s": max(result.ended_s - result.window[1], 0.0),
        "latencies_s": sorted(r.latency for r in result.records if r.completed),
        "num_started": len(result.records),
    })  # fmt: skip
    return summary


def discount_prefix_hits(record: dict, flops_per_tok: float) -> None:
    """Achieved FLOP/s without the prompt tokens the prefix cache served (they cost no model FLOPs)."""
    queries = record.get("prefix_cache_queries") or 0
    if queries:
        computed = record["prefill_tokens_per_s"] * (1 - record["prefix_cache_hits"] / queries)
        achieved = (computed + record["tok_per_s"]) * flops_per_tok
        record["achieved_gflops"] = achieved / 1e9


def run_workload(system: str, url: str, workload_name: str, workload: list[RequestSpec], levels: tuple[int, ...],
                 plan: Plan, flops_per_tok: float, drain_s: float, between: Callable[[], None],
                 after_level: Callable[[dict, float, float], None] | None = None,
                 batch_grace_s: float | None = None, baseline: bool = False) -> list[dict]:  # fmt: skip
    """Every level in turn; `between` clears the server after each (reset, or wait for the replica to drain)."""
    mode = plan.mode
    records = []
    for users in levels:
        with tqdm(desc=f"{system:>12} | {workload_name} | {users:>3} users", unit="req", leave=True) as bar:
            start = time.time()
            duration_s = mode.baseline_duration_s if baseline else mode.duration_s
            result = asyncio.run(run_level(f"{url}/generate", request_cycle(workload), users, duration_s, drain_s,
                                           bar, batch_grace_s=batch_grace_s, warmup_s=mode.warmup_s,
                                           warmup_completions=1 if baseline else users))  # fmt: skip
            end = time.time()
            record = level_record(result, flops_per_tok, plan.price_per_hour)
            bar.set_postfix_str(f"{record['tok_per_s']:.1f} tok/s, {record['requests_completed']} done, "
                                f"{record['requests_censored']} censored")  # fmt: skip
        if after_level is not None:
            after_level(record, start, end)
        records.append(record)
        between()
    return records


def run_baseline(system: str, plan: Plan, flops_per_tok: float, log_dir: Path) -> dict[str, Any]:
    module = {"naive": "naive_flask", "static": "static_batching"}[system]
    server = BaselineServer(module, plan.model, plan.threads, log_dir)
    print(f"starting the {system} server ...", flush=True)
    try:
        server.start()  # inside: a start that fails or is interrupted still stops the process

        previous = {"live_slots": 0, "allocated_slots": 0}

        def batch_stats(record: dict, start: float, end: float) -> None:
            if system == "static":  # the padded batches of this level only
                stats = server.stats()
                live = stats["live_slots"] - previous["live_slots"]
                allocated = stats["allocated_slots"] - previous["allocated_slots"]
                previous.update(live_slots=stats["live_slots"], allocated_slots=stats["allocated_slots"])
                record["server_stats"] = {**stats, "kv_memory_efficiency": live / allocated if allocated else None}

        mixed = run_workload(system, server.url, "mixed", plan.workloads["mixed"], plan.mode.levels, plan, flops_per_tok,
                             plan.mode.baseline_drain_s, server.reset, batch_stats, batch_grace_s=1.0,
                             baseline=True)  # fmt: skip
        rss = server.peak_rss()
    finally:
        server.stop()
    return {"mixed": mixed, "peak_rss_bytes": rss, "kv_budget_bytes": 0}


def run_serve(systems: list[str], plan: Plan, flops_per_tok: float, log_dir: Path) -> dict[str, Any]:
    variants = {v: {**ENGINE_VARIANTS[v], "max_model_len": 2048, "num_threads": plan.threads}
                for v in SERVE_VARIANTS if v in systems}  # fmt: skip
    cluster = ServeCluster(variants, plan.model, log_dir)
    print(f"starting Ray and `serve run` with {', '.join(variants)} ...", flush=True)
    results: dict[str, Any] = {v: {} for v in variants}
    timelines: dict[str, list[dict[str, Any]]] = {}
    try:
        cluster.start()
        for variant in variants:
            results[variant]["kv_budget_bytes"] = _kv_budget(cluster)
        for variant, workloads in _serve_schedule(variants, plan).items():
            sampler = kv_sampler(cluster, variant)
            with sampler:
                try:
                    _run_variant(cluster, variant, workloads, sampler, results[variant], plan, flops_per_tok)
                except Exception as error:  # noqa: BLE001 — the other variants still run
                    traceback.print_exc()
                    results[variant]["error"] = f"{type(error).__name__}: {error}"
            timelines[variant] = sampler.samples
        for name, rss in cluster.peak_rss().items():
            results[name.split(" ")[0]]["peak_rss_bytes"] = {name: rss}
    finally:
        print("stopping Ray ...", flush=True)
        cluster.stop()
    return {"systems": results, "kv_timelines": timelines}


def _run_variant(cluster: ServeCluster, variant: str, workloads: list[tuple[str, tuple[int, ...]]],
                 sampler: Poller[dict[str, Any]], results: dict[str, Any], plan: Plan,
                 flops_per_tok: float) -> None:  # fmt: skip
    """The variant's workloads, each record with the KV statistics sampled during its level."""
    for workload_name, levels in workloads:
        before = _counters(cluster.replica_stats(variant))

        def snapshot(record: dict, start: float, end: float) -> None:
            after = _counters(cluster.replica_stats(variant))
            record.update(kv_summary(sampler.samples, start, end))
            record.update({key: after[key] - before[key] for key in after})
            before.update(after)
            discount_prefix_hits(record, flops_per_tok)

        results[workload_name] = run_workload(
            variant, cluster.url(variant), workload_name, plan.workloads[workload_name], levels, plan, flops_per_tok,
            plan.mode.drain_s, lambda: _wait_idle(cluster, variant), snapshot,
        )  # fmt: skip


def _counters(stats: dict[str, Any]) -> dict[str, int]:
    return {"prefix_cache_hits": stats["prefix_cache_hits"], "prefix_cache_queries": stats["prefix_cache_queries"],
            "preemptions": stats["num_preemptions"]}  # fmt: skip


def _wait_idle(cluster: ServeCluster, variant: str) -> None:
    try:
        cluster.wait_idle(variant)
    except TimeoutError as error:  # measured anyway; the next level starts with leftovers, and the log says so
        print(f"warning: {error}", flush=True)


def _kv_budget(cluster: ServeCluster) -> int:
    import yaml

    from bench.servers import DEPLOY_CONFIG

    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    return int(config["applications"][0]["args"]["engine"].get("kv_cache_memory_bytes", 2 * GiB))


def _serve_schedule(variants: dict[str, Any], plan: Plan) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Which workloads run on which variant: the mixed sweep on paged and contiguous KV; shared prefixes with
    prefix caching off and on; n=4 on paged KV (bench.kv_sharing compares its memory with independent requests)."""
    mode = plan.mode
    schedule: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    if "paged" in variants:
        schedule["paged"] = [("mixed", mode.levels), ("shared_prefix", (mode.shared_users,)),
                             ("parallel_sampling", (mode.parallel_users,))]  # fmt: skip
    if "contiguous" in variants:
        schedule["contiguous"] = [("mixed", mode.contiguous_levels or mode.levels)]
    if "paged-prefix" in variants:
        schedule["paged-prefix"] = [("shared_prefix", (mode.shared_users,))]
    return schedule


# --- report ---------------------------------------------------------------------------------------------------


def set_utilization(systems: dict[str, Any], peak_flops: float) -> None:
    """Every level's compute utilization: its achieved FLOP/s ÷ `peak_flops`."""
    for system in systems.values():
        for levels in system.values():
            for level in levels if isinstance(levels, list) else []:
                if "achieved_gflops" in level:
                    level["compute_utilization"] = level["achieved_gflops"] * 1e9 / peak_flops


def at_users(levels: list[dict], users: int) -> dict | None:
    return next((level for level in levels if level["users"] == users), None)


def users_supported(levels: list[dict], bound_s: float) -> str:
    """The most users of a tested level whose p99 latency stays within the bound; "< N" when even the fewest
    tested, N, exceed it."""
    within = [level["users"] for level in levels if level["latency_p99_s"] <= bound_s]
    return str(max(within)) if within else f"< {min(level['users'] for level in levels)}"


def fmt_latency(level: dict | None, key: str) -> str:
    if level is None:
        return "–"
    value = level[key]
    if math.isinf(value):
        return f"> {level['followed_s']:.0f} s"
    if math.isnan(value):
        return "–"
    if key == "latency_mean_s" and level.get("latency_mean_estimated"):
        return f"~{value:.0f} s (est.)"
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1f}×"


def build_report(results: dict[str, Any]) -> str:
    meta = results["meta"]
    mode = Mode(**{**meta["mode"], "levels": tuple(meta["mode"]["levels"]), "output_len": tuple(meta["mode"]["output_len"])})
    systems = results["systems"]
    hu, lu = mode.headline_users, mode.latency_users
    naive = at_users(systems.get("naive", {}).get("mixed", []), hu)
    naive_lat = at_users(systems.get("naive", {}).get("mixed", []), lu)
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; {meta['model']}; torch {meta['torch']} fp32, "
        f"{meta['threads']} threads per server. **No GPU**: compute utilization is achieved model FLOP/s ÷ this "
        f"CPU's measured fp32 GEMM peak ({meta['gemm_peak_gflops']:.0f} GFLOP/s). Mode `{mode.name}`: each level "
        f"starts with an unmeasured warm-up (this system: until as many requests as users have completed, at most "
        f"{mode.warmup_s:.0f} s; the baselines: until their first answer), then measures "
        f"{mode.duration_s:.0f} s of closed-loop users (the baselines: {mode.baseline_duration_s:.0f} s; throughput "
        f"over that window), then gives the requests "
        f"started in it up to {mode.drain_s:.0f} s to finish (the baselines, whose queues never drain: until the "
        f"request or batch being served completes, at most {mode.baseline_drain_s:.0f} s); the rest are "
        f"cut off and counted as censored: a latency shown as '> N s' is a lower bound, '(est.)' is Little's law, "
        f"users ÷ completed requests per second. Workload `mixed`: prompts 32-256 tokens, "
        f"{mode.output_len[0]}-{mode.output_len[1]} output tokens, greedy, EOS ignored. Cost from "
        f"${meta['price_per_hour']:.2f}/hour.",
        "",
        f"| system | users supported (p99 ≤ {mode.latency_bound_s:.0f} s) | req/s @{hu} | tok/s @{hu} | vs naive | "
        f"avg latency @{lu} | p99 latency @{lu} | TTFT p50 / p99 @{lu} | compute utilization (CPU) @{hu} | "
        f"KV memory efficiency @{hu} | $ / 1M tokens @{hu} | peak RSS (bound) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("naive", "static", "contiguous", "paged"):
        if name not in systems or "mixed" not in systems[name]:
            continue
        levels = systems[name]["mixed"]
        head, lat = at_users(levels, hu), at_users(levels, lu)
        if head is None:
            continue
        ratio = head["tok_per_s"] / naive["tok_per_s"] if head and naive and naive["tok_per_s"] else None
        kv = _kv_cell(name, head)
        rss = _rss_cell(systems[name], meta)
        ttft = (f"{fmt_latency(lat, 'ttft_p50_s')} / {fmt_latency(lat, 'ttft_p99_s')}"
                if lat else "–")  # fmt: skip
        lines.append(
            f"| {LABELS[name]} | {users_supported(levels, mode.latency_bound_s)} | {head['req_per_s']:.2f} | "
            f"{head['tok_per_s']:.1f} | {fmt_ratio(ratio)} | {fmt_latency(lat, 'latency_mean_s')} | "
            f"{fmt_latency(lat, 'latency_p99_s')} | {ttft} | {head['compute_utilization']:.0%} | {kv} | "
            f"{head['cost_per_1m_tokens']:.2f} | {rss} |"
        )
    lines += ["", "Throughput (output tok/s) by concurrency, workload `mixed`:", ""]
    lines.append("| system | " + " | ".join(f"{u} users" for u in mode.levels) + " |")
    lines.append("|---|" + "---|" * len(mode.levels))
    for name in ("naive", "static", "contiguous", "paged"):
        if name in systems and "mixed" in systems[name]:
            cells = [f"{at_users(systems[name]['mixed'], u)['tok_per_s']:.1f}" if at_users(systems[name]["mixed"], u)
                     else "–" for u in mode.levels]  # fmt: skip
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    lines += _workload_tables(systems, mode)
    lines += ["", "Targets:", "", "| target | achieved | met |", "|---|---|---|"]
    for target in results["targets"]:
        lines.append(f"| {target['target']} | {target['achieved']} | {'yes' if target['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _kv_cell(name: str, level: dict | None) -> str:
    if level is None:
        return "–"
    if name == "naive":
        return "n/a (1 sequence, cache grows per token)"
    if name == "static":
        stats = level.get("server_stats") or {}
        value = stats.get("kv_memory_efficiency")
        return f"{value:.0%} (padding)" if value is not None else "–"
    value = level.get("kv_memory_efficiency")
    return f"{value:.1%}" if value is not None else "–"


def _rss_cell(system: dict, meta: dict) -> str:
    rss = [v for v in system.get("peak_rss_bytes", {}).values() if v]
    if not rss:
        return "–"
    bound = meta["weights_bytes"] + system.get("kv_budget_bytes", 0) + RSS_OVERHEAD_BYTES
    return f"{max(rss) / GiB:.2f} GiB ({bound / GiB:.2f})"


def _workload_tables(systems: dict, mode: Mode) -> list[str]:
    lines = []
    rows = [(n, systems[n]["shared_prefix"][0]) for n in ("paged", "paged-prefix")
            if n in systems and systems[n].get("shared_prefix")]  # fmt: skip
    if rows:
        lines += ["", f"Shared 512-token system prompt, {mode.shared_users} users:", "",
                  "| system | tok/s | req/s | avg latency | TTFT p50 | prefix cache hit rate |", "|---|---|---|---|---|---|"]  # fmt: skip
        for name, level in rows:
            hit = level["prefix_cache_hits"] / level["prefix_cache_queries"] if level.get("prefix_cache_queries") else 0
            lines.append(f"| {LABELS[name]} | {level['tok_per_s']:.1f} | {level['req_per_s']:.2f} | "
                         f"{fmt_latency(level, 'latency_mean_s')} | {fmt_latency(level, 'ttft_p50_s')} | "
                         f"{hit:.0%} |")  # fmt: skip
    rows = [(n, systems[n]["parallel_sampling"][0]) for n in ("paged", "contiguous")
            if n in systems and systems[n].get("parallel_sampling")]  # fmt: skip
    if rows:
        lines += ["", f"Parallel sampling (n=4, temperature 1), {mode.parallel_users} users:", "",
                  "| system | tok/s | avg latency | most sequences running | peak KV usage | KV memory efficiency |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, level in rows:
            peak = level.get("kv_usage_peak")
            efficiency = level.get("kv_memory_efficiency")
            lines.append(f"| {LABELS[name]} | {level['tok_per_s']:.1f} | {fmt_latency(level, 'latency_mean_s')} | "
                         f"{level.get('max_running', '–')} | {'–' if peak is None else f'{peak:.0%}'} | "
                         f"{'–' if efficiency is None else f'{efficiency:.1%}'} |")  # fmt: skip
    return lines


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    meta, systems = results["meta"], results["systems"]
    hu, lu = meta["mode"]["headline_users"], meta["mode"]["latency_users"]

    def level(name: str, workload: str, users: int | None = None) -> dict | None:
        levels = systems.get(name, {}).get(workload, [])
        return at_users(levels, users) if users is not None else (levels[0] if levels else None)

    targets = []

    def add(target: str, achieved: str, met: bool) -> None:
        targets.append({"target": target, "achieved": achieved, "met": bool(met)})

    paged, naive, static = level("paged", "mixed", hu), level("naive", "mixed", hu), level("static", "mixed", hu)
    if paged and naive and naive["tok_per_s"]:
        ratio = paged["tok_per_s"] / naive["tok_per_s"]
        add(f"paged ≥ 20× naive tok/s @{hu} users", f"{ratio:.2f}×", ratio >= 20)
    if paged and static and static["tok_per_s"]:
        ratio = paged["tok_per_s"] / static["tok_per_s"]
        add(f"paged ≥ 3× static batching tok/s @{hu} users", f"{ratio:.2f}×", ratio >= 3)
    paged_lat, naive_lat = level("paged", "mixed", lu), level("naive", "mixed", lu)
    if paged_lat and naive_lat and math.isfinite(naive_lat["latency_mean_s"]) and naive_lat["latency_mean_s"] > 0:
        ratio = paged_lat["latency_mean_s"] / naive_lat["latency_mean_s"]
        add(f"avg latency @{lu} users ≤ 1/10 of naive", f"1/{1 / ratio:.2f}", ratio <= 0.1)
    contiguous = level("contiguous", "mixed", hu)
    if paged and paged.get("kv_memory_efficiency") is not None:
        waste = (f"; contiguous {contiguous['kv_memory_efficiency']:.1%}"
                 if contiguous and contiguous.get("kv_memory_efficiency") is not None else "")  # fmt: skip
        add(f"paged KV memory efficiency ≥ 96% @{hu} users, contiguous shows waste",
            f"{paged['kv_memory_efficiency']:.1%}{waste}", paged["kv_memory_efficiency"] >= 0.96)
    off, on = level("paged", "shared_prefix"), level("paged-prefix", "shared_prefix")
    if off and on and off["tok_per_s"]:
        ratio = on["tok_per_s"] / off["tok_per_s"]
        add("shared prefix: prefix caching ≥ 2× throughput without", f"{ratio:.2f}×", ratio >= 2)
    for name in SERVE_VARIANTS:
        for process, rss in systems.get(name, {}).get("peak_rss_bytes", {}).items():
            bound = meta["weights_bytes"] + systems[name].get("kv_budget_bytes", 0) + RSS_OVERHEAD_BYTES
            if rss:
                add(f"{process} peak RSS ≤ weights + KV budget + 1.5 GiB", f"{rss / GiB:.2f} GiB ≤ {bound / GiB:.2f} GiB",
                    rss <= bound)  # fmt: skip
    return targets


def plot(results: dict[str, Any], output_dir: Path, suffix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems, meta = results["systems"], results["meta"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in ("naive", "static", "contiguous", "paged"):
        levels = systems.get(name, {}).get("mixed")
        if levels:
            ax.plot([lv["users"] for lv in levels], [lv["tok_per_s"] for lv in levels], marker="o", label=LABELS[name])
    ax.set_xscale("log", base=2)
    levels = meta["mode"]["levels"]
    ax.set_xticks(levels, [str(u) for u in levels])
    ax.set_xlabel("concurrent users (closed loop)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Throughput vs concurrency ({meta['model']}, CPU, no GPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(output_dir / f"serving{suffix}_throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    users = meta["mode"]["latency_users"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in ("naive", "static", "contiguous", "paged"):
        level = at_users(systems.get(name, {}).get("mixed", []), users)
        if level and level["latencies_s"]:
            xs = level["latencies_s"]
            ys = [(i + 1) / level["num_started"] for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=LABELS[name])
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of requests started")
    ax.set_title(f"Latency CDF at {users} users (curves end below 1: requests cut off at the window's end)",
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(output_dir / f"serving{suffix}_latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    timelines = results.get("kv_timelines", {})
    shown = [n for n in ("paged", "contiguous") if timelines.get(n)]
    if shown:
        fig, axes = plt.subplots(len(shown), 1, figsize=(8, 2.6 * len(shown)), squeeze=False)
        for ax, name in zip(axes[:, 0], shown):
            samples = timelines[name]
            t0 = samples[0]["t"]
            ax.plot([s["t"] - t0 for s in samples], [100 * s["kv_usage"] for s in samples], label="KV blocks in use")
            ax.plot([s["t"] - t0 for s in samples],
                    [100 * s["kv_memory_efficiency"] if s["kv_memory_efficiency"] is not None else float("nan")
                     for s in samples], label="live / allocated slots", alpha=0.8)  # fmt: skip
            for workload, tag in (("mixed", ""), ("shared_prefix", "shared prefix "), ("parallel_sampling", "n=4 ")):
                for level in systems[name].get(workload, []):
                    ax.axvline(level["started_at"] - t0, color="grey", lw=0.5)
                    ax.text(level["started_at"] - t0, 102, f"{tag}{level['users']}u", fontsize=7)
            ax.set_ylim(0, 110)
            ax.set_ylabel("%")
            ax.set_title(LABELS[name], fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        axes[-1, 0].set_xlabel("seconds since the variant's first load level")
        fig.tight_layout()
        paths.append(output_dir / f"serving{suffix}_kv_usage.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# --- main -----------------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # asyncio.run's own SIGINT handler only cancels the running level, and that cancellation is swallowed on the
    # way out (the run then went on to the next level): with a handler of our own, Ctrl-C ends the whole run and
    # the `finally` blocks stop every server.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` and `kill` too: the servers are stopped on the way out

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--systems", default="naive,static,paged,paged-prefix,contiguous")
    parser.add_argument("--levels", default=None, help="comma-separated user counts (default: the mode's)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load per level")
    parser.add_argument("--drain", type=float, default=None, help="seconds for requests in flight after a level")
    parser.add_argument("--warmup", type=float, default=None, help="most seconds of unmeasured load before a level")
    parser.add_argument("--price-per-hour", type=float, default=0.10,
                        help="USD per machine-hour for the cost column (default: a 2-vCPU cloud VM)")  # fmt: skip
    parser.add_argument("--latency-bound", type=float, default=None, help="p99 seconds for 'users supported'")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--update", action="store_true",
                        help="re-run only --systems and merge them into the existing results file")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="one pass of --users streaming clients: per-process CPU shares, served vs offline "
                             "(bench/serving_profile.py)")  # fmt: skip
    parser.add_argument("--users", type=int, default=64, help="--profile: clients sent at once")
    parser.add_argument("--label", default="current", help="--profile: results file suffix")
    parser.add_argument("--engine", default=None, help="--profile: engine overrides as JSON")
    parser.add_argument("--app", default=None,
                        help='--profile: app overrides as JSON ({"args.stream_messages_per_s": 100, "runtime_env": ...})')
    parser.add_argument("--skip-offline", action="store_true", help="--profile: served pass only")
    args = parser.parse_args()
    if args.profile:
        from bench import serving_profile

        log_dir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
        result = serving_profile.run_profile(args.model, args.users, args.seed, args.label, log_dir,
                                             num_cpus=len(os.sched_getaffinity(0)),
                                             engine_overrides=json.loads(args.engine) if args.engine else None,
                                             app_overrides=json.loads(args.app) if args.app else None,
                                             offline=not args.skip_offline)
        result["machine"] = machine_description()
        print(serving_profile.report(result))
        print(f"written {serving_profile.save(result, args.output_dir)}")
        return

    mode = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.levels:
        overrides["levels"] = tuple(int(u) for u in args.levels.split(","))
        overrides["contiguous_levels"] = ()
    if args.duration is not None:
        overrides["duration_s"] = overrides["baseline_duration_s"] = args.duration
    if args.drain is not None:
        overrides["drain_s"] = args.drain
    if args.warmup is not None:
        overrides["warmup_s"] = args.warmup
    if args.latency_bound is not None:
        overrides["latency_bound_s"] = args.latency_bound
    mode = Mode(**{**asdict(mode), **overrides})
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(LABELS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {sorted(LABELS)}")
    plan = Plan(mode, systems, args.model, args.threads, args.price_per_hour, args.seed, args.output_dir)
    suffix = "_quick" if args.quick else ""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serving-"))  # server logs, Serve config: outside the repo
    print(f"server logs in {log_dir}", flush=True)

    words = word_vocabulary(AutoTokenizer.from_pretrained(str(args.model)))
    plan.workloads = {
        "mixed": mixed_workload(words, 512, args.seed, output_len=mode.output_len),
        "shared_prefix": shared_prefix_workload(words, 512, args.seed + 1, output_len=mode.output_len),
        "parallel_sampling": parallel_sampling_workload(words, 256, args.seed + 2, output_len=mode.output_len),
    }
    hf_config = AutoConfig.from_pretrained(str(args.model))
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(hf_config)
    mixed = plan.workloads["mixed"]
    context = statistics.mean(s.prompt_tokens + s.max_tokens / 2 for s in mixed)
    flops_per_tok = flops_per_token(meta_model, hf_config, context)
    torch.set_num_threads(args.threads)
    print("measuring this machine's fp32 GEMM peak ...", flush=True)
    peak = measure_gemm_peak()
    weights = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_description(),
            "model": args.model.name,
            "torch": torch.__version__,
            "threads": args.threads,
            "flops_per_token_gflop": flops_per_tok / 1e9,
            "weights_bytes": weights,
            "price_per_hour": args.price_per_hour,
            "mode": asdict(mode),
        },
        "systems": {},
    }
    started = time.monotonic()
    # NOTE: a system that fails is reported as failed; the others' measurements are still written.
    for system in ("naive", "static"):
        if system in systems:
            try:
                results["systems"][system] = run_baseline(system, plan, flops_per_tok, log_dir)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                results["systems"][system] = {"error": f"{type(error).__name__}: {error}"}
    if any(v in systems for v in SERVE_VARIANTS):
        try:
            serve = run_serve(systems, plan, flops_per_tok, log_dir)
            results["systems"].update(serve["systems"])
            results["kv_timelines"] = serve["kv_timelines"]
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            for variant in SERVE_VARIANTS:
                if variant in systems:
                    results["systems"][variant] = {"error": f"{type(error).__name__}: {error}"}
    results["meta"]["wall_s"] = time.monotonic() - started
    # A shared VM's GEMM reading varies (91 to 191 GFLOP/s on this machine in one day): measure again at the end
    # and divide by the better reading, so that a slow moment at the start does not inflate every utilization.
    print("measuring the GEMM peak again ...", flush=True)
    peak_after = measure_gemm_peak()
    results["meta"]["gemm_peak_readings_gflops"] = [peak / 1e9, peak_after / 1e9]
    results["meta"]["gemm_peak_gflops"] = max(peak, peak_after) / 1e9
    set_utilization(results["systems"], max(peak, peak_after))
    previous_file = args.output_dir / f"serving{suffix}.json"
    if args.update and previous_file.exists():
        previous = restore(json.loads(previous_file.read_text()))
        previous["systems"].update(results["systems"])
        previous.setdefault("kv_timelines", {}).update(results.get("kv_timelines", {}))
        if {"naive", "static"} & set(systems):
            previous["meta"]["mode"]["baseline_drain_s"] = mode.baseline_drain_s
        previous["meta"].setdefault("reruns", []).append({"systems": systems, "date": results["meta"]["date"],
                                                          "wall_s": results["meta"]["wall_s"]})  # fmt: skip
        results = previous
    for name, system in results["systems"].items():
        system["label"] = LABELS[name]
    results["targets"] = evaluate_targets(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(results)
    (args.output_dir / f"serving{suffix}.md").write_text(report)
    (args.output_dir / f"serving{suffix}.json").write_text(json.dumps(finite(results), indent=1))
    paths = plot(results, args.output_dir, suffix)
    print()
    print(report)
    print(f"wrote {args.output_dir / f'serving{suffix}.json'}, serving{suffix}.md and "
          f"{', '.join(p.name for p in paths)} in {results['meta']['wall_s'] / 60:.1f} min")  # fmt: skip


def restore(value: Any) -> Any:
    """The inverse of `finite`, for a results file read back."""
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {key: restore(item) for key, item in value.items()}
    if isinstance(value, list):
        return [restore(item) for item in value]
    return value


def finite(value: Any) -> Any:
    """`value` with inf / nan floats as the strings "inf" / "nan", so the JSON file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


if __name__ == "__main__":
    main()
