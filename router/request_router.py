"""KV-aware request routing: prefix-block affinity from what replicas report, else the emptiest KV cache.

`KVAwareRequestRouter` is a Ray Serve `RequestRouter` set on the replica deployment; it runs in every caller of
that deployment (the ingress). The policy itself, `rank_replicas` in `router.routing_policy`, is a pure function
over `ReplicaView`s so it can be tested without Ray.

Signals, freshest first:
- Serve's per-replica count of ongoing requests (updated by this router on every send, and by probes);
- what each replica reported in `record_routing_stats` (free KV blocks, waiting requests, the hashes of its most
  recently cached prefix blocks), refreshed every `request_routing_stats_period_s`;
- what this router sent where in the last few seconds: a request being prefilled has not registered its blocks
  yet, but the next request with the same prefix should still go there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from replicas.contract import ContractError, RoutingStats
from router.metrics import record_predicted_hit_tokens, record_routing_decision, start_predicted_hit_series
from router.routing_policy import (
    ReplicaView,
    RoutingPolicy,
    hold_replica,
    is_saturated,
    kv_source,
    matched_blocks,
    rank_replicas,
)

logger = logging.getLogger(__name__)


class KVAwareRequestRouter(RequestRouter):
    """Routes `LLMReplica.generate` calls by the `prefix_hashes` keyword the ingress passes with each request."""

    def initialize_state(
        self,
        stats_stale_after_s: float = 5.0,
        recent_route_ttl_s: float = 5.0,
        max_recent_routes: int = 4096,
        min_match_blocks: int = RoutingPolicy.min_match_blocks,
        max_waiting_for_affinity: int = RoutingPolicy.max_waiting_for_affinity,
        max_imbalance: int = RoutingPolicy.max_imbalance,
        min_wait_blocks: int = RoutingPolicy.min_wait_blocks,
        wait_per_block_s: float = RoutingPolicy.wait_per_block_s,
        max_affinity_wait_s: float = RoutingPolicy.max_affinity_wait_s,
        max_held_for_affinity: int = RoutingPolicy.max_held_for_affinity,
        max_hold_s: float | None = RoutingPolicy.max_hold_s,
        slot_wait_s: float = 0.2,
        kv_transfer: bool = RoutingPolicy.kv_transfer,
    ) -> None:
        self._slot_wait_s = slot_wait_s  # see `choose_replicas`; 0: no wait, Serve's backoff alone paces the asks
        self._slot_waiters: set[asyncio.Future[None]] = set()  # requests waiting in `choose_replicas` for a slot
        self._stats_stale_after_s = stats_stale_after_s
        self._recent_route_ttl_s = recent_route_ttl_s
        self._max_recent_routes = max_recent_routes
        self._policy = RoutingPolicy(
            min_match_blocks, max_waiting_for_affinity, max_imbalance, min_wait_blocks, wait_per_block_s,
            max_affinity_wait_s, max_held_for_affinity, max_hold_s, kv_transfer,
        )
        # replica id -> {block hash: when this router last sent a request with that block there}, oldest first
        self._recent_routes: dict[str, OrderedDict[str, float]] = {}
        self._routed_since_report: dict[str, tuple[float, int]] = {}  # replica id -> (report timestamp, count)
        self._reports: dict[str, _ParsedReport] = {}  # replica id -> its latest report, parsed once
        self._unreadable_reported: set[str] = set()  # replicas whose unreadable report was logged
        self._stale_warned: set[str] = set()  # replicas whose stats are stale now, and were warned about
        self._rng = random.Random()
        # request -> {replica id: (why it was ranked, prefix tokens it should hold)}, from the latest ranking,
        # until Serve reports the placement
        self._routing_reasons: OrderedDict[str, dict[str, tuple[str, int]]] = OrderedDict()
        # request -> its place in the queue: requests waiting for a slot, each for the saturated replica holding its
        # prefix or for any; least recently asked about first
        self._waiting: OrderedDict[str, _WaitingRequest] = OrderedDict()
        # request -> when it first passed up a replica with a free slot to wait for its prefix's holder
        self._passed_up_since: OrderedDict[str, float] = OrderedDict()
        self._block_size = 0  # tokens per prefix hash, from the replicas' reports (0 until the first)
        self._series_started = False

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """The ranks `_rank` gives; when none of them has a free slot, after waiting up to `slot_wait_s` for one to
        free (a request completing through this router), ranking again each time one does.

        Serve's own wait between asks is a backoff of up to `max_backoff_s` (0.2 s here): a slot that frees just
        after an ask stays idle that long, and a held request learns late that its replica has room. Waiting here
        for the completion itself hands the slot over within milliseconds; the backoff is then skipped (this wait
        was it). Completions through other callers (several ingress replicas) are not seen: the wait times out.
        """
        ranks = self._rank(candidate_replicas, pending_request)
        if pending_request is None or self._slot_wait_s <= 0:
            return ranks
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._slot_wait_s
        waited = False
        while not any(self._has_free_slot(replica) for rank in ranks for replica in rank):
            # A held request re-ranks often: its hold ends at a bound (a prefill's time) that no event marks.
            held = self._waiting.get(_request_key(pending_request))
            timeout = min(deadline - loop.time(), _HELD_RERANK_S if held and held.held_for else self._slot_wait_s)
            if timeout <= 0:
                break
            waited = True
            slot_freed = loop.create_future()
            self._slot_waiters.add(slot_freed)
            try:
                await asyncio.wait({slot_freed}, timeout=timeout)
            finally:
                self._slot_waiters.discard(slot_freed)
            await asyncio.sleep(0)  # Serve's queue-length update for the completion runs first
            ranks = self._rank(candidate_replicas, pending_request)
        if waited:
            pending_request.routing_context.should_backoff = False
        return ranks

    def _has_free_slot(self, replica: RunningReplica) -> bool:
        ongoing = self._replica_queue_len_cache.get(replica.replica_id)
        return ongoing is None or ongoing < replica.max_ongoing_requests  # unknown: Serve probes it

    def _wake_slot_waiters(self) -> None:
        for slot_freed in list(self._slot_waiters):  # (update_replicas may come from another thread)
            slot_freed.get_loop().call_soon_threadsafe(_set_if_pending, slot_freed)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._wake_slot_waiters()

    def _rank(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        request_hashes = _request_hashes(pending_request)
        if pending_request is not None:
            # NOTE: every call ranks all replicas, so when none accepts, Serve should back off before asking
            # again; without this flag it retries at once, and the busy loop starves the probes it waits for.
            pending_request.routing_context.should_backoff = True
        now = time.time()
        while self._waiting and now - next(iter(self._waiting.values())).asked_at > _WAITING_FRESH_S:
            self._waiting.popitem(last=False)  # not asked about lately (oldest asked first): cancelled, gone
        key = _request_key(pending_request) if pending_request is not None else None
        created_at = getattr(pending_request, "created_at", None)  # when Serve queued it
        if created_at is None:
            previous = self._waiting.get(key) if key is not None else None
            created_at = previous.queued_at if previous is not None else now
        held, held_ahead, num_older_waiting = self._waiting_ahead(key, created_at)
        views = [self._view(replica, request_hashes, now, held, held_ahead) for replica in candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        queued_s = now - created_at
        waited_s = self._passed_up_s(key, views, now)
        ranks = rank_replicas(
            views, len(request_hashes), self._policy, self._rng, waited_s, queued_s, num_older_waiting
        )  # fmt: skip
        holder = hold_replica(views, self._policy, waited_s, queued_s)
        source = kv_source(views, self._policy)
        if pending_request is not None:
            # Wherever Serve places it, the replica fetches the blocks it lacks from the source first.
            if source is not None:
                pending_request.kwargs["kv_source"] = {"address": source.stats.kv_transfer_address,
                                                       "num_blocks": source.prefix_blocks}  # fmt: skip
            else:
                pending_request.kwargs.pop("kv_source", None)
        if _TRACE is not None:
            _trace("rank", key=key, blocks=len(request_hashes), queued_s=queued_s, waited_s=waited_s,
                   older_waiting=num_older_waiting, held_for=holder.replica_id if holder is not None else None,
                   kv_source=source.replica_id if source is not None else None,
                   ranks=ranks, views=[_trace_view(view) for view in views])  # fmt: skip
        if key is not None:  # why each replica was offered, counted once Serve has placed the request
            # A replica is expected to hit what it holds, or what it fetches from the source.
            fetched = source.prefix_blocks if source is not None else 0
            predicted = {view.replica_id: max(view.prefix_blocks, fetched) * self._block_size for view in views}
            self._routing_reasons[key] = {
                replica_id: (reason, predicted[replica_id]) for rank, reason in ranks for replica_id in rank
            }
            # Until Serve reports it placed, the request waits (for a replica, or any): newer requests queue behind.
            future = getattr(pending_request, "future", None)  # done once placed, or cancelled
            held_for = holder.replica_id if holder is not None else None
            self._waiting[key] = _WaitingRequest(created_at, held_for, now, future)
            self._waiting.move_to_end(key)
            for table in (self._routing_reasons, self._waiting, self._passed_up_since):
                while len(table) > self._max_recent_routes:  # requests never placed (refused, cancelled)
                    table.popitem(last=False)
        return [[by_id[replica_id] for replica_id in rank] for rank, _ in ranks]

    def _passed_up_s(self, key: str | None, views: list[ReplicaView], now: float) -> float | None:
        """For how long another replica has had a free slot, without a break, while the request waited for its
        prefix's holder (0 while every other is saturated: a slot that freed and was taken again does not count);
        None when unknown (no request to track)."""
        if key is None:
            return None
        deepest = max((view.prefix_blocks for view in views), default=0)
        if not any(not is_saturated(view) for view in views if view.prefix_blocks < deepest):
            self._passed_up_since.pop(key, None)
            return 0.0
        return now - self._passed_up_since.setdefault(key, now)

    def _waiting_ahead(self, request_key: str | None, created_at: float) -> tuple[dict[str, int], dict[str, int], int]:
        """Of the other requests waiting for a slot (the table holds only those asked about lately: see
        `choose_replicas`), leaving out any whose caller gave up: how many are held back for each replica; of those,
        how many were queued before this request; and how many queued before it wait for any replica."""
        held: dict[str, int] = {}
        held_ahead: dict[str, int] = {}
        num_older_waiting = 0
        for key, waiting in self._waiting.items():
            if key == request_key or (waiting.future is not None and waiting.future.done()):
                continue  # a request its caller gave up on is still asked about until Serve notices
            older = waiting.queued_at < created_at
            if waiting.held_for is None:
                num_older_waiting += older
                continue
            held[waiting.held_for] = held.get(waiting.held_for, 0) + 1
            if older:
                held_ahead[waiting.held_for] = held_ahead.get(waiting.held_for, 0) + 1
        return held, held_ahead, num_older_waiting

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        unique_id = replica_id.unique_id
        key = _request_key(pending_request)
        if _TRACE is not None:
            _trace("routed", key=key, replica=unique_id, blocks=len(_request_hashes(pending_request)))
        self._waiting.pop(key, None)
        self._passed_up_since.pop(key, None)
        reason, predicted_tokens = self._routing_reasons.pop(key, {}).get(unique_id, ("fallback", 0))
        deployment_id = getattr(self, "_deployment_id", None)  # set by Serve's constructor
        application = getattr(deployment_id, "app_name", "")
        if not self._series_started:
            self._series_started = True
            start_predicted_hit_series(application)
        record_routing_decision(reason, application)
        record_predicted_hit_tokens(predicted_tokens, application)
        now = time.time()
        recent = self._recent_routes.setdefault(unique_id, OrderedDict())
        for block_hash in _request_hashes(pending_request):
            recent[block_hash] = now
            recent.move_to_end(block_hash)
        while len(recent) > self._max_recent_routes:
            recent.popitem(last=False)
        timestamp, count = self._routed_since_report.get(unique_id, (0.0, 0))
        self._routed_since_report[unique_id] = (timestamp, count + 1)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._wake_slot_waiters()  # a new replica has free slots
        live = {replica.replica_id.unique_id for replica in replicas}
        for table in (self._recent_routes, self._routed_since_report, self._reports):
            for unique_id in [unique_id for unique_id in table if unique_id not in live]:
                del table[unique_id]
        self._unreadable_reported &= live
        self._stale_warned &= live

    def _view(
        self,
        replica: RunningReplica,
        request_hashes: list[str],
        now: float,
        held: dict[str, int],
        held_ahead: dict[str, int],
    ) -> ReplicaView:
        unique_id = replica.replica_id.unique_id
        report = self._parsed_report(unique_id, replica.routing_stats)
        stats: RoutingStats | None = None
        reported: frozenset[str] = frozenset()
        routed_since = 0
        if report is not None:
            stats, reported = report.stats, report.prefix_hashes
            self._block_size = stats.block_size
            since_timestamp, count = self._routed_since_report.get(unique_id, (stats.timestamp, 0))
            if since_timestamp < stats.timestamp:  # the newer report already counts what was sent before it
                count = 0
            self._routed_since_report[unique_id] = (stats.timestamp, count)
            routed_since = count
            age_s = now - stats.timestamp
            if age_s > self._stats_stale_after_s:
                # A replica that stopped reporting may be stuck: its old hashes no longer attract requests (what
                # this router sent there lately still does, until the recent routes' own TTL).
                stats, reported = None, frozenset()
                if unique_id not in self._stale_warned:
                    self._stale_warned.add(unique_id)
                    logger.warning(
                        "replica %s: routing stats are %.0fs old (bound %.0fs): routing it by queue length only; is "
                        "its engine stuck?", unique_id, age_s, self._stats_stale_after_s,
                    )  # fmt: skip
            else:
                self._stale_warned.discard(unique_id)
        recent = self._recent_routes.get(unique_id, OrderedDict())
        while recent and now - next(iter(recent.values())) > self._recent_route_ttl_s:
            recent.popitem(last=False)
        return ReplicaView(
            replica_id=unique_id,
            max_ongoing_requests=replica.max_ongoing_requests,
            num_ongoing=self._replica_queue_len_cache.get(replica.replica_id),
            stats=stats,
            prefix_blocks=matched_blocks(request_hashes, reported, recent) if request_hashes else 0,
            routed_since_report=routed_since,
            num_held=held.get(unique_id, 0),
            num_held_ahead=held_ahead.get(unique_id, 0),
        )

    def _parsed_report(self, unique_id: str, raw: dict[str, Any] | None) -> _ParsedReport | None:
        """The replica's latest report as `RoutingStats`, parsed once per report (Serve hands the same dict until
        the next); None when it has not reported, or its report does not parse (logged once per replica)."""
        if not raw:
            return None
        cached = self._reports.get(unique_id)
        if cached is not None and cached.raw is raw:
            return cached if cached.stats is not None else None
        try:
            stats: RoutingStats | None = RoutingStats.from_dict(raw)
        except (ContractError, TypeError) as error:
            stats = None
            if unique_id not in self._unreadable_reported:
                self._unreadable_reported.add(unique_id)
                logger.error("replica %s: routing stats do not parse (%s): routing it as if it had not reported; "
                             "are the router and the replica from different versions?", unique_id, error)  # fmt: skip
        hashes = frozenset(stats.prefix_hashes) if stats is not None else frozenset()
        self._reports[unique_id] = _ParsedReport(raw, stats, hashes)
        return self._reports[unique_id] if stats is not None else None


@dataclass(frozen=True)
class _ParsedReport:
    raw: dict[str, Any]  # what Serve handed over (compared by identity: a new report is a new dict)
    stats: RoutingStats | None  # None: it did not parse
    prefix_hashes: frozenset[str]


class _WaitingRequest(NamedTuple):
    queued_at: float  # when Serve queued it
    held_for: str | None  # the replica it is held back for; None: it waits for any
    asked_at: float  # when Serve last asked about it
    future: Any  # Serve's future for its placement: done once placed, or cancelled (None when unknown)


_HELD_RERANK_S = 0.05  # how often a request held for its prefix's holder is ranked again while it waits for a slot
_WAITING_FRESH_S = 2.0  # Serve asks again about a request it could not place at least every 0.2 s (max_backoff_s)


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _request_key(pending_request: PendingRequest) -> str:
    """Serve's id of this call (unique per call: see `router.streaming.own_request_id`)."""
    metadata = getattr(pending_request, "metadata", None)
    return getattr(metadata, "internal_request_id", None) or str(id(pending_request))


def _request_hashes(pending_request: PendingRequest | None) -> list[str]:
    if pending_request is None:
        return []
    hashes = pending_request.kwargs.get("prefix_hashes")
    return list(hashes) if hashes else []


# Decision trace for diagnosing routing (bench.routing passes it on): set PAGED_SERVE_ROUTING_TRACE to a path prefix
# and every router process appends one JSON line per ranking and per placement to <prefix>.<pid>.
_TRACE = os.environ.get("PAGED_SERVE_ROUTING_TRACE")


def _trace(event: str, **fields: Any) -> None:
    with open(f"{_TRACE}.{os.getpid()}", "a") as file:
        file.write(json.dumps({"t": time.time(), "event": event, **fields}, default=str) + "\n")


def _trace_view(view: ReplicaView) -> dict[str, Any]:
    stats = view.stats
    return {
        "id": view.replica_id, "ongoing": view.num_ongoing, "prefix_blocks": view.prefix_blocks,
        "held": view.num_held, "held_ahead": view.num_held_ahead, "routed_since_report": view.routed_since_report,
        "waiting": stats.num_waiting if stats else None, "free_blocks": stats.num_free_blocks if stats else None,
        "prefill_s_per_token": stats.prefill_seconds_per_token if stats else None,
    }  # fmt: skip
