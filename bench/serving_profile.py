"""`python -m bench.serving --profile`: where a served token's CPU goes, and what Serve costs against the engine.

One pass of `--users` streaming clients sent at once (the mixed workload: prompts of 32-256 words, 16-128 output
tokens, EOS ignored) through `/v1/completions` of deploy/config.yaml's application as it is, then the same requests
through the engine offline in this process (same engine settings, the threads the replica computes with), then one
user alone (served and offline). Reads every process's CPU time from /proc before and after the pass and prints
each group's share of the run (replica, ingress, proxy, Serve controller, Ray daemons, client) beside tokens per
second, and the replica's stream messages per output token. Both passes are also given as a fraction of this
machine's GEMM peak in the engine's dtype, measured before the cluster starts (FLOPs counted as bench.offline does).
Results: bench/results/serving_profile-<label>.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.loadgen import RequestSpec, StreamError, mixed_workload, percentile, sse_events, word_vocabulary
from bench.servers import ServeCluster

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANT = "llm"
# Process groups, matched in order against a process's command line (Ray sets a worker's title to its actor).
PROCESS_GROUPS = (
    ("replica", ("LLMReplica",)),
    ("ingress", ("OpenAIIngress",)),
    ("proxy", ("ProxyActor",)),
    ("serve controller", ("ServeController",)),
    ("serve run (driver)", ("serve run", "bin/serve")),
    ("ray daemons", ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray::",
                     "default_worker", "ray start")),  # fmt: skip
)


@dataclass
class StreamRecord:
    start: float
    first_token: float | None = None
    end: float | None = None
    tokens: int = 0
    events: int = 0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, completion tokens so far)
    error: str | None = None


def process_group(cmdline: str) -> str:
    for group, markers in PROCESS_GROUPS:
        if any(marker in cmdline for marker in markers):
            return group
    return "other"


def cluster_processes(cluster: ServeCluster) -> list[psutil.Process]:
    roots = [p for p in (cluster.head, cluster.serve) if p is not None]
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            parent = psutil.Process(root.pid)
        except psutil.Error:
            continue
        for process in [parent, *parent.children(recursive=True)]:
            found[process.pid] = process
    return list(found.values())


def cpu_snapshot(processes: list[psutil.Process]) -> dict[int, tuple[str, float]]:
    """pid -> (group, CPU seconds so far); the client is this process."""
    snapshot = {}
    for process in processes:
        try:
            times = process.cpu_times()
            snapshot[process.pid] = (process_group(" ".join(process.cmdline())), times.user + times.system)
        except psutil.Error:
            continue
    own = psutil.Process().cpu_times()
    snapshot[os.getpid()] = ("client", own.user + own.system)
    return snapshot


def cpu_shares(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
               wall_s: float) -> dict[str, Any]:  # fmt: skip
    """CPU seconds per group during the run, as a share of all CPU used and of the machine's capacity."""
    seconds: dict[str, float] = {}
    for pid, (group, total) in after.items():
        seconds[group] = seconds.get(group, 0.0) + total - before.get(pid, (group, 0.0))[1]
    used = sum(seconds.values())
    capacity = wall_s * len(os.sched_getaffinity(0))
    return {
        "wall_s": wall_s,
        "capacity_cpu_s": capacity,
        "used_cpu_s": used,
        "groups": {g: {"cpu_s": s, "share_of_used": s / used if used else 0.0, "cores": s / wall_s}
                   for g, s in sorted(seconds.items(), key=lambda kv: -kv[1])},  # fmt: skip
        "idle_share": max(0.0, 1 - used / capacity),
    }


async def stream_one(client: httpx.AsyncClient, url: str, spec: RequestSpec, t0: float) -> StreamRecord:
    record = StreamRecord(start=time.perf_counter() - t0)
    body = {"prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    try:
        async for event in sse_events(client, f"{url}/v1/completions", body):
            record.events += 1
            usage = event.get("usage") or {}
            tokens = usage.get("completion_tokens", record.tokens)
            if tokens > record.tokens:
                now = time.perf_counter() - t0
                record.first_token = record.first_token if record.first_token is not None else now
                record.arrivals.append((now, tokens))
                record.tokens = tokens
    except StreamError as error:
        record.error = str(error)
        return record
    record.end = time.perf_counter() - t0
    return record


async def one_pass(url: str, specs: list[RequestSpec]) -> tuple[list[StreamRecord], float]:
    limits = httpx.Limits(max_connections=len(specs) + 8, max_keepalive_connections=len(specs) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(stream_one(client, url, spec, t0) for spec in specs))
        return list(records), time.perf_counter() - t0


def stream_summary(records: list[StreamRecord], wall_s: float) -> dict[str, Any]:
    done = [r for r in records if r.error is None and r.end is not None]
    ttfts = [r.first_token - r.start for r in done if r.first_token is not None]
    gaps = [(t1 - t0) / (n1 - n0) for r in done for (t0, n0), (t1, n1) in zip(r.arrivals, r.arrivals[1:])]
    tokens = sum(r.tokens for r in done)
    errors = [r.error for r in records if r.error is not None]
    if not ttfts:
        raise RuntimeError(f"no request completed; first error: {errors[0] if errors else 'none'}")
    return {
        "requests": len(records), "failed": len(records) - len(done), "first_error": errors[0] if errors else None, "output_tokens": tokens,
        "tok_s": tokens / wall_s if wall_s else 0.0, "wall_s": wall_s,
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
        "itl_p50_ms": 1000 * percentile(gaps, 0.5), "itl_p99_ms": 1000 * percentile(gaps, 0.99),
        "events_per_token": sum(r.events for r in done) / tokens if tokens else 0.0,
        "per_token_ms": [1000 * (r.end - r.first_token) / max(1, r.tokens - 1) for r in done if r.first_token],
    }  # fmt: skip


def offline_run(model: Path, engine_config: dict[str, Any], specs: list[RequestSpec]) -> dict[str, Any]:
    """The same requests through `LLM.generate` in this process, then one request alone (time per output token)."""
    from bench.offline import Request, workload_flops
    from replicas.llm import LLM
    from replicas.sampling_params import SamplingParams

    llm = LLM(str(model), **engine_config)
    params = [SamplingParams(temperature=0.0, max_tokens=s.max_tokens, ignore_eos=True) for s in specs]
    llm.generate([specs[0].prompt], [params[0]], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([s.prompt for s in specs], params)
    wall_s = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    engine, per_token = llm.engine, []
    runner = engine.model_runner
    computed = [Request(o.prompt_token_ids, len(o.outputs[0].token_ids)) for o in outputs]
    flops = workload_flops(runner.model, runner.hf_config, computed)
    for i, spec in enumerate(specs[:3]):
        engine.add_request(f"alone-{i}", spec.prompt, SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True))
        first = end = None
        while engine.has_unfinished():
            for output in engine.step():
                now = time.perf_counter()
                first = first if first is not None else now
                end = now
        per_token.append(1000 * (end - first) / 127)
    del llm, engine
    return {"output_tokens": tokens, "wall_s": wall_s, "tok_s": tokens / wall_s, "workload_flops": flops,
            "dtype": str(runner.dtype).removeprefix("torch."), "one_user_per_token_ms": statistics.median(per_token)}


def stream_messages(cluster: ServeCluster) -> dict[str, int]:
    """The replica's stream messages and output tokens so far (its `stream_counters`)."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMReplica", app_name=VARIANT)
    return handle.stream_counters.remote().result(timeout_s=30)


def run_profile(model: Path, users: int, seed: int, label: str, log_dir: Path, num_cpus: int,
                engine_overrides: dict[str, Any] | None = None, app_overrides: dict[str, Any] | None = None,
                offline: bool = True) -> dict[str, Any]:  # fmt: skip
    from transformers import AutoTokenizer

    from bench.servers import DEPLOY_CONFIG
    import yaml

    words = word_vocabulary(AutoTokenizer.from_pretrained(str(model)))
    specs = mixed_workload(words, users, seed, output_len=(16, 128))
    alone = mixed_workload(words, 3, seed + 1, output_len=(128, 128))
    cluster = ServeCluster({VARIANT: dict(engine_overrides or {})}, model, log_dir, num_cpus=num_cpus,
                           app_overrides=app_overrides)  # fmt: skip
    result: dict[str, Any] = {"label": label, "users": users, "seed": seed, "engine_overrides": engine_overrides,
                              "app_overrides": app_overrides, "gemm_peak_gflops": gemm_peaks(num_cpus)}  # fmt: skip
    try:
        print("starting Ray and `serve run` ...", flush=True)
        cluster.start()
        url = cluster.url(VARIANT)
        asyncio.run(one_pass(url, specs[:4]))  # warm-up: first requests pay one-time costs
        processes = cluster_processes(cluster)
        messages_before = stream_messages(cluster)
        before = cpu_snapshot(processes)
        print(f"{users} streaming users, one pass ...", flush=True)
        records, wall_s = asyncio.run(one_pass(url, specs))
        after = cpu_snapshot(cluster_processes(cluster))
        messages_after = stream_messages(cluster)
        result["served"] = stream_summary(records, wall_s)
        result["cpu"] = cpu_shares(before, after, wall_s)
        sent = {k: messages_after[k] - messages_before[k] for k in messages_after}
        result["replica_messages_per_token"] = sent["messages"] / sent["tokens"] if sent["tokens"] else None
        print("one user alone ...", flush=True)
        single = [asyncio.run(one_pass(url, [spec]))[0][0] for spec in alone]
        result["served_one_user_per_token_ms"] = statistics.median(stream_summary(single, 1.0)["per_token_ms"])
    finally:
        cluster.stop()
    if not offline:
        result["served"].pop("per_token_ms")
        return result
    engine = yaml.safe_load(DEPLOY_CONFIG.read_text())["applications"][0]["args"]["engine"]
    engine = {**engine, **(engine_overrides or {})}
    engine.setdefault("num_threads", len(os.sched_getaffinity(0)))
    print(f"the same requests offline ({engine['num_threads']} threads) ...", flush=True)
    result["offline"] = offline_run(model, engine, specs)
    result["offline"]["one_user_per_token_ms_alone"] = result["offline"].pop("one_user_per_token_ms")
    result["ratio_served_to_offline"] = result["served"]["tok_s"] / result["offline"]["tok_s"]
    peak = result["gemm_peak_gflops"].get(result["offline"]["dtype"])
    if peak:
        for run in (result["served"], result["offline"]):
            run["fraction_of_gemm_peak"] = result["offline"]["workload_flops"] / run["wall_s"] / (peak * 1e9)
    result["one_user_served_over_offline"] = (result["served_one_user_per_token_ms"]
                                              / result["offline"]["one_user_per_token_ms_alone"])  # fmt: skip
    result["served"].pop("per_token_ms")
    return result


def gemm_peaks(threads: int) -> dict[str, float]:
    """This machine's GEMM peak (GFLOP/s) on `threads` threads: float32, and bfloat16 where the CPU multiplies it."""
    import torch

    from bench.offline import measure_gemm_peak
    from kernels.cpu_features import cpu_has_bf16_compute

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16_compute() else [])
        return {str(dtype).removeprefix("torch."): measure_gemm_peak(dtype=dtype) / 1e9 for dtype in dtypes}
    finally:
        torch.set_num_threads(previous)


def report(result: dict[str, Any]) -> str:
    served, cpu = result["served"], result["cpu"]
    offline = result.get("offline")
    versus = (f"offline {offline['tok_s']:.1f} tok/s on the same requests: "
              f"**{100 * result['ratio_served_to_offline']:.0f}%**" if offline else "offline not run")  # fmt: skip
    alone = (f"{offline['one_user_per_token_ms_alone']:.1f} offline ({result['one_user_served_over_offline']:.2f}x)"
             if offline else "offline not run")  # fmt: skip
    lines = [
        f"## serving profile `{result['label']}`: {result['users']} users, one pass",
        "",
        f"served {served['tok_s']:.1f} tok/s, {versus}; TTFT p50 {served['ttft_p50_s']:.2f} s, "
        f"p99 {served['ttft_p99_s']:.2f} s; ITL p50 {served['itl_p50_ms']:.0f} ms, p99 {served['itl_p99_ms']:.0f} ms; "
        f"{served['failed']} failed",
        peak_line(result),
        f"one user: {result['served_one_user_per_token_ms']:.1f} ms/token served, {alone}; "
        f"replica stream messages per output token {result['replica_messages_per_token'] or 0:.2f}, "
        f"SSE events per token {served['events_per_token']:.2f}",
        "",
        f"| process | CPU s | cores | CPU ms per output token | share of CPU used (run {cpu['wall_s']:.1f} s, "
        f"{cpu['capacity_cpu_s']:.0f} CPU-s capacity, idle {100 * cpu['idle_share']:.0f}%) |",
        "|---|---|---|---|---|",
    ]
    tokens = max(1, served["output_tokens"])
    for group, row in cpu["groups"].items():
        lines.append(f"| {group} | {row['cpu_s']:.1f} | {row['cores']:.2f} | {1000 * row['cpu_s'] / tokens:.2f} | "
                     f"{100 * row['share_of_used']:.1f}% |")
    serve_ray = sum(cpu["groups"].get(g, {}).get("share_of_used", 0.0)
                    for g in ("ingress", "proxy", "serve controller", "serve run (driver)", "ray daemons"))  # fmt: skip
    lines.append(f"| **Serve + Ray (all but replica and client)** | | | | **{100 * serve_ray:.1f}%** |")
    return "\n".join(lines)


def peak_line(result: dict[str, Any]) -> str:
    offline = result.get("offline")
    if not offline or "fraction_of_gemm_peak" not in offline:
        return "fraction of the GEMM peak: needs the offline pass"
    dtype = offline["dtype"]
    return (f"{100 * result['served']['fraction_of_gemm_peak']:.0f}% of the measured {dtype} GEMM peak served, "
            f"{100 * offline['fraction_of_gemm_peak']:.0f}% offline (peak {result['gemm_peak_gflops'][dtype]:.0f} "
            f"GFLOP/s, {offline['workload_flops'] / 1e12:.2f} TFLOP: 2 x parameters per computed token + attention)")


def save(result: dict[str, Any], output_dir: Path = RESULTS_DIR) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"serving_profile-{result['label']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(report(result) + "\n")
    return path
