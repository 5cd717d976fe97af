"""Replica metrics for Prometheus, recorded with `ray.util.metrics` (Ray serves them on its metrics export port).

Names follow vLLM's where the meaning matches, under this project's prefix instead of `vllm:` (Ray deprecates
colons in metric names) and exported by Ray with its `ray_` prefix: vLLM's `vllm:num_requests_running` is
`ray_paged_serve_num_requests_running` here, `vllm:time_to_first_token_seconds` is
`ray_paged_serve_time_to_first_token_seconds`, and Ray appends `_total` to counters. Every series is tagged with
`model` and `replica`.

- Load gauges and engine counters are refreshed from `AsyncEngine.stats()` by a background thread every
  `refresh_period_s`; counters advance by the difference between two snapshots.
- Per-request latencies come from each output's `RequestMetrics` (engine timestamps), observed by the replica as
  the request's outputs stream through it.

This module is the replica's (like `deployment.py`); the engine itself stays free of Ray.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ray.util.metrics import Counter, Gauge, Histogram

from replicas.async_engine import AsyncEngine
from replicas.outputs import EngineStats, RequestOutput

logger = logging.getLogger(__name__)

PREFIX = "paged_serve_"
TAG_KEYS = ("model", "replica")

# Seconds. TTFT and queue time span sub-second prefix hits up to minutes behind a long queue on CPU.
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0]
QUEUE_TIME_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0]
# One decode step: milliseconds on a GPU, up to a second for a large batch on a small CPU.
INTER_TOKEN_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0]
E2E_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0]
# Tokens computed per engine step (decodes plus prefill chunks), up to max_num_batched_tokens.
ITERATION_TOKENS_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096, 8192]
FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class _RequestTiming:
    """What the replica remembers about one request between its output deltas."""

    last_token_time: float | None = None


class ReplicaMetrics:
    """Owns this replica's metric objects; `observe` is called with each output, the thread refreshes the rest."""

    def __init__(self, engine: AsyncEngine, model: str, replica: str, refresh_period_s: float = 1.0) -> None:
        self.engine = engine
        self.tags = {"model": model, "replica": replica}
        self.refresh_period_s = refresh_period_s

        def gauge(name: str, description: str) -> Gauge:
            return Gauge(PREFIX + name, description, tag_keys=TAG_KEYS).set_default_tags(self.tags)

        def counter(name: str, description: str, tag_keys: tuple[str, ...] = TAG_KEYS) -> Counter:
            return Counter(PREFIX + name, description, tag_keys=tag_keys).set_default_tags(self.tags)

        def histogram(name: str, description: str, boundaries: list[float]) -> Histogram:
            return Histogram(PREFIX + name, description, boundaries, tag_keys=TAG_KEYS).set_default_tags(self.tags)

        # vLLM: vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc
        self.num_requests_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.num_total_blocks = gauge("kv_cache_num_blocks", "KV cache blocks of the replica.")
        # vLLM: vllm:prefix_cache_queries, vllm:prefix_cache_hits, vllm:num_preemptions, vllm:prompt_tokens,
        # vllm:generation_tokens (counters; Ray exports them with `_total`)
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Sequences preempted (KV blocks freed, recomputed later).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        # Prefixes fetched from other replicas instead of computed (replicas/kv_transfer.py); not in vLLM.
        self.kv_imported_tokens = counter(
            "kv_transfer_imported_tokens", "Prompt tokens whose K/V was fetched from another replica."
        )
        self.kv_fetch_failures = counter(
            "kv_transfer_fetch_failures", "Prefix fetches from another replica that failed (the prefix was computed)."
        )
        # vLLM: vllm:request_success (by finished_reason)
        self.request_success = counter(
            "request_success", "Finished requests by finish reason (stop, length, abort).", (*TAG_KEYS, "finished_reason")
        )
        # vLLM: vllm:iteration_tokens_total, vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
        # vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens computed per engine step (batch size).", ITERATION_TOKENS_BUCKETS
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "From arrival at the engine to the first sampled token.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Between consecutive tokens of a request.", INTER_TOKEN_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "From arrival at the engine to the last token.", E2E_BUCKETS
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "From arrival at the engine to first being scheduled.", QUEUE_TIME_BUCKETS
        )

        # NOTE: a counter is exported from its first increment on, and Ray refuses inc(0); start each series at 0
        # (what Prometheus recommends) so rates are defined, and dashboards show 0 rather than no data.
        for zeroed in (self.prefix_cache_queries, self.prefix_cache_hits, self.num_preemptions, self.prompt_tokens,
                       self.generation_tokens, self.kv_imported_tokens, self.kv_fetch_failures):  # fmt: skip
            _start_at_zero(zeroed, {})
        for reason in FINISH_REASONS:
            _start_at_zero(self.request_success, {"finished_reason": reason})

        self._requests: dict[str, _RequestTiming] = {}
        self._last_stats: EngineStats | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="replica-metrics", daemon=True)
        self._thread.start()

    # --- per request (the replica's event loop) ---------------------------------------------------------------

    def observe(self, output: RequestOutput) -> None:
        """Record what this output delta tells about its request: first token, token gaps, the end."""
        timings = output.metrics
        if timings is None:
            return
        timing = self._requests.setdefault(output.request_id, _RequestTiming())
        if timings.last_token_time is not None and timings.last_token_time != timing.last_token_time:
            # A delta may carry several steps' tokens (a caller that fell behind): their gaps are spread evenly.
            num_tokens = max((len(completion.token_ids) for completion in output.outputs), default=1)
            if timing.last_token_time is None:
                if timings.first_token_time is not None:
                    self.time_to_first_token.observe(timings.first_token_time - timings.arrival_time)
                    self._observe_gaps(timings.last_token_time - timings.first_token_time, num_tokens - 1)
                if timings.first_scheduled_time is not None:
                    self.request_queue_time.observe(timings.first_scheduled_time - timings.arrival_time)
            else:
                self._observe_gaps(timings.last_token_time - timing.last_token_time, num_tokens)
            timing.last_token_time = timings.last_token_time
        if output.finished:
            self.finish(output)

    def _observe_gaps(self, elapsed_s: float, num_gaps: int) -> None:
        for _ in range(num_gaps):
            self.inter_token_latency.observe(elapsed_s / num_gaps)

    def finish(self, output: RequestOutput) -> None:
        """The request ended (or its caller went away): count it by finish reason and forget it."""
        self._requests.pop(output.request_id, None)
        timings = output.metrics
        if timings is not None and timings.last_token_time is not None:
            self.e2e_request_latency.observe(timings.last_token_time - timings.arrival_time)
        reasons = [completion.finish_reason for completion in output.outputs if completion.finish_reason]
        reason = reasons[0] if reasons else "abort"
        self.request_success.inc(1, tags={"finished_reason": reason if reason in FINISH_REASONS else "abort"})

    def kv_fetched(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self.kv_imported_tokens.inc(num_tokens)

    def kv_fetch_failed(self) -> None:
        self.kv_fetch_failures.inc()

    def cancelled(self, request_id: str) -> None:
        """The caller went away before the end: the engine aborts the request."""
        if self._requests.pop(request_id, None) is not None:
            self.request_success.inc(1, tags={"finished_reason": "abort"})

    # --- periodic (background thread) -------------------------------------------------------------------------

    def refresh(self) -> None:
        """Set the load gauges from the engine's latest snapshot and advance the counters by what changed."""
        stats = self.engine.stats()
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_perc.set(stats.kv_usage)
        self.num_total_blocks.set(stats.num_total_blocks)
        previous = self._last_stats
        for counter, field_name in (
            (self.prefix_cache_queries, "prefix_cache_queries"),
            (self.prefix_cache_hits, "prefix_cache_hits"),
            (self.num_preemptions, "num_preemptions"),
            (self.prompt_tokens, "num_prompt_tokens"),
            (self.generation_tokens, "num_generation_tokens"),
        ):
            delta = getattr(stats, field_name) - (getattr(previous, field_name) if previous else 0)
            if delta > 0:
                counter.inc(delta)
        self._last_stats = stats
        step_sizes = self.engine.engine.recent_step_num_tokens
        while step_sizes:
            self.iteration_tokens.observe(step_sizes.popleft())

    def _refresh_loop(self) -> None:
        while not self._stopping.wait(self.refresh_period_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 — metrics must never take the replica down
                logger.exception("refreshing replica metrics failed")

    def shutdown(self) -> None:
        self._stopping.set()


def _start_at_zero(counter: Counter, tags: dict[str, str]) -> None:
    """Export `counter` (with `tags`) at 0 before its first increment. Ray's public `inc` refuses 0."""
    try:
        counter._record(0, tags=tags)  # noqa: SLF001 — the recording call under `inc`, minus its value check
    except Exception:  # noqa: BLE001 — a Ray without it: the series appears at its first increment instead
        logger.debug("could not start %s at 0", counter.info.get("name"), exc_info=True)
