"""The Ray Serve replica: one `AsyncEngine`, streaming output deltas and reporting its load to the request router."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from replicas import EngineDeadError, RequestError
from replicas.async_engine import AsyncEngine
from replicas.config import EngineConfig
from replicas.contract import EngineUnavailableError, RequestOutput, RequestRejectedError, ResumeState, RoutingStats
from replicas.kv_transfer import KVTransferServer, fetch_prefix
from replicas.metrics import ReplicaMetrics
from replicas.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How many of the most recently registered prefix-cache block hashes a replica reports (about 32 KiB of hex).
DEFAULT_REPORTED_PREFIX_HASHES = 1024
# Each stream message costs the replica, the ingress and the proxy about as much CPU as it costs (bench.serving
# --profile): past this rate over all of a replica's streams, a stream's deltas are merged (docs/design.md).
DEFAULT_STREAM_MESSAGES_PER_S = 200.0
# How long a replica waits for another to send it a prefix before computing it itself (a local transfer of a few
# MB takes milliseconds; a prefix of 1,000 tokens takes ~0.3 s to compute on one busy CPU core).
DEFAULT_KV_FETCH_TIMEOUT_S = 0.5


class EngineUnhealthyError(RuntimeError):
    """Raised by the health check: Serve restarts a replica whose engine loop died or stalled."""


@serve.deployment(
    name="LLMReplica",
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=10,
)
class LLMReplica:
    """Serves one engine. Methods: `generate` (streaming), `model_info`, plus Serve's health and routing hooks."""

    def __init__(
        self,
        engine_config: dict[str, Any],
        stall_timeout_s: float = 60.0,
        reported_prefix_hashes: int = DEFAULT_REPORTED_PREFIX_HASHES,
        stream_messages_per_s: float | None = DEFAULT_STREAM_MESSAGES_PER_S,
        kv_transfer: bool = True,
        kv_fetch_timeout_s: float = DEFAULT_KV_FETCH_TIMEOUT_S,
    ) -> None:
        config = EngineConfig(**engine_config)
        if config.num_threads is None:
            # NOTE: a Ray worker sees every core of the node; use the CPUs Serve reserved for this replica instead,
            # or replicas sharing a node oversubscribe it (10x slower on small machines).
            config.num_threads = _assigned_cpus()
        self.engine = AsyncEngine(config)
        self.stall_timeout_s = stall_timeout_s
        self.reported_prefix_hashes = reported_prefix_hashes
        self._model_info = self.engine.model_info()
        self.metrics = ReplicaMetrics(self.engine, model=self._model_info.model, replica=_replica_id())
        # Stream messages sent to callers and the output tokens they carried (bench.serving --profile reads them).
        self._stream_messages = 0
        self._stream_tokens = 0
        self._stream_messages_per_s = stream_messages_per_s
        self._num_open_streams = 0
        # Other replicas fetch the prefixes this one caches from here, when the router sends them a request whose
        # prefix it holds (replicas/kv_transfer.py); none without a prefix cache.
        serves_prefixes = kv_transfer and config.enable_prefix_caching
        self.kv_server = KVTransferServer(self.engine.export_prefix) if serves_prefixes else None
        self.kv_fetch_timeout_s = kv_fetch_timeout_s
        logger.info("replica ready: %s; prefixes served at %s", self._model_info,
                    self.kv_server.address if self.kv_server else "(kv transfer off)")  # fmt: skip

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefix_hashes: list[str] | None = None,
        priority: int = 0,
        resume: ResumeState | None = None,
        kv_source: dict[str, Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's output deltas. `prefix_hashes` is for the request router; the engine re-derives them.
        `priority`: lower runs first under the `priority` and `fair` scheduling policies (ignored by `fcfs`).
        `resume`: continue a request another replica lost (router/migration.py); the deltas carry new tokens only.
        `kv_source`: `{"address", "num_blocks"}` of a replica holding that many of the prompt's leading blocks (the
        request router sets it): the blocks missing here are fetched from it first (replicas/kv_transfer.py).

        Raises `RequestRejectedError` for a request the engine refuses and `EngineUnavailableError` when the engine
        loop is gone. Cancelling the call (a client disconnect) aborts the request and frees its KV blocks.
        """
        finished = sent = False
        if kv_source is not None and self.kv_server is not None:
            await self._fetch_prefix(prompt_token_ids, kv_source)
        self._num_open_streams += 1
        try:
            async for output in self.engine.generate(
                request_id, prompt_token_ids=prompt_token_ids, params=params, output_kind="delta", priority=priority,
                resume=resume,
            ):
                self.metrics.observe(output)
                finished = output.finished
                self._stream_messages += 1
                self._stream_tokens += sum(len(completion.token_ids) for completion in output.outputs)
                if sent:
                    output.prompt_token_ids = []  # the caller has the prompt: only the first delta carries it
                sent, sent_at = True, time.monotonic()
                yield output
                if not finished and self._stream_messages_per_s is not None:
                    # Let the next steps' deltas pile up (AsyncEngine merges them): at most this many messages per
                    # second over all streams. A lone stream's interval is shorter than a step: no delay.
                    interval_s = self._num_open_streams / self._stream_messages_per_s
                    delay_s = sent_at + interval_s - time.monotonic()
                    if delay_s > 0:
                        await asyncio.sleep(delay_s)
        # NOTE: re-raised as the contract's torch-free errors: the caller unpickles what is raised here, and the
        # engine's own classes live in modules that import torch (the ingress must not load it).
        except RequestError as error:
            raise RequestRejectedError(str(error), error.param) from error
        except EngineDeadError as error:
            raise EngineUnavailableError(str(error)) from error
        finally:
            self._num_open_streams -= 1
            if not finished:
                self.metrics.cancelled(request_id)

    async def _fetch_prefix(self, prompt_token_ids: list[int], kv_source: dict[str, Any]) -> None:
        """Import the prompt's leading blocks `kv_source` holds and this replica does not (best effort: on any
        failure the request computes them)."""
        address, num_blocks = kv_source.get("address"), int(kv_source.get("num_blocks") or 0)
        if not address or address == self.kv_server.address:
            return
        have = self.engine.cached_prefix_blocks(prompt_token_ids, num_blocks)
        if num_blocks <= have:
            return
        prefix = await fetch_prefix(address, prompt_token_ids, have, num_blocks, self.kv_fetch_timeout_s)
        if prefix is not None:
            self.engine.import_prefix(prompt_token_ids, prefix)  # queued ahead of the request: it finds them
            self.metrics.kv_fetched(prefix.num_blocks * prefix.keys.shape[2])
        else:
            self.metrics.kv_fetch_failed()

    def model_info(self) -> dict[str, Any]:
        """`ModelInfo.to_dict()`: what the ingress needs to validate requests the way this engine will."""
        return self._model_info.to_dict()

    def stream_counters(self) -> dict[str, int]:
        """Stream messages sent and the output tokens in them, since the replica started."""
        return {"messages": self._stream_messages, "tokens": self._stream_tokens}

    def check_health(self) -> None:
        """Fails when the engine loop died, or has had work but not finished a step for `stall_timeout_s`."""
        if not self.engine.is_alive:
            raise EngineUnhealthyError("the engine loop is not running; see the replica log for its traceback")
        stalled_s = time.monotonic() - self.engine.heartbeat
        if stalled_s > self.stall_timeout_s:
            raise EngineUnhealthyError(f"the engine loop made no progress for {stalled_s:.0f}s")

    def record_routing_stats(self) -> dict[str, Any]:
        """`RoutingStats.to_dict()`: load and recent prefix-cache contents, pushed by Serve to every router."""
        stats = self.engine.stats()
        recent_hashes = self.engine.recent_prefix_hashes(self.reported_prefix_hashes)
        return RoutingStats(
            timestamp=time.time(),
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            num_free_blocks=stats.num_free_blocks,
            num_total_blocks=stats.num_total_blocks,
            num_cached_blocks=stats.num_cached_blocks,
            block_size=stats.block_size,
            num_requests_finished=stats.num_requests_finished,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            kv_slots_allocated=stats.kv_slots_allocated,
            kv_slots_live=stats.kv_slots_live,
            num_generation_tokens=stats.num_generation_tokens,
            num_preemptions=stats.num_preemptions,
            pid=os.getpid(),
            prefix_hashes=[block_hash.hex() for block_hash in recent_hashes],
            prefill_seconds_per_token=stats.prefill_seconds_per_token,
            kv_transfer_address=self.kv_server.address if self.kv_server is not None else None,
            num_imported_tokens=stats.num_imported_tokens,
        ).to_dict()

    def __del__(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the metrics thread, the prefix server and the engine. NOTE: a process that exits with the prefix
        server still open hangs or aborts at exit ("terminate called without an active exception")."""
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.shutdown()
        kv_server = getattr(self, "kv_server", None)
        if kv_server is not None:
            kv_server.close()
            self.kv_server = None
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=2.0)


def _replica_id() -> str:
    """Serve's id of this replica (the `replica` tag of its metrics); "local" outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 — constructed outside a Serve replica (unit tests)
        return "local"


def _assigned_cpus() -> int:
    """Whole CPUs Ray assigned to this actor (at least 1); all of the machine's outside Ray."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 — not in a Ray worker
        cpus = None
    if not cpus:
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, math.floor(cpus))
