"""The routing policy: which replica a request should go to, as pure functions over `ReplicaView`s (testable
without Ray). `router.request_router.KVAwareRequestRouter` builds the views from Serve's state and the replicas'
reports and hands Serve the ranks.

1. Prefix affinity: the replica holding the longest leading run of the request's blocks, unless overloaded.
2. Replicas with fresh stats: fewest waiting, then most free KV blocks (saturated ones last).
3. Replicas whose stats are stale, missing or unreadable: power of two choices on ongoing requests.
A request may be held for a saturated replica holding its prefix much deeper than any other (`hold_replica`),
unless that replica serves its prefixes to the others (`kv_source`: the request takes the prefix along).
"""

from __future__ import annotations

import random
from collections.abc import Container
from dataclasses import dataclass

from replicas.contract import RoutingStats


@dataclass(frozen=True)
class ReplicaView:
    """What the policy knows about one replica."""

    replica_id: str
    max_ongoing_requests: int
    num_ongoing: int | None = None  # Serve's cached queue length; None when unknown
    stats: RoutingStats | None = None  # the replica's latest routing stats; None when missing, unreadable or stale
    prefix_blocks: int = 0  # leading blocks of the request it holds (reported, or recently routed there)
    routed_since_report: int = 0  # requests this router sent since the stats were taken
    num_held: int = 0  # other requests this router is holding back for it while it is saturated
    num_held_ahead: int = 0  # of those, the ones Serve queued before this request


@dataclass(frozen=True)
class RoutingPolicy:
    """Knobs of `rank_replicas`; set through `request_router_kwargs`."""

    min_match_blocks: int = 1  # prefix blocks a replica must hold to attract a request
    max_waiting_for_affinity: int = 8  # a replica with more waiting requests is overloaded for affinity
    max_imbalance: int = 4  # ... and so is one with this many more ongoing requests than the least loaded
    # A request whose prefix one replica holds at least `min_wait_blocks` deeper than any other waits for that
    # replica while it is saturated, for as long as prefilling those blocks elsewhere would take, counted from when
    # it was queued however the wait was spent (while every other replica is saturated too, going elsewhere would
    # queue as well, then pay the prefill), and once another has a free slot, only while that slot stays free, at
    # most `max_affinity_wait_s`. The prefill time is what the replicas measure
    # (`RoutingStats.prefill_seconds_per_token`); before any has, `wait_per_block_s` a block (16 tokens of a 135M
    # model on one busy EPYC thread) and no bound while all are saturated. At most `max_held_for_affinity`
    # requests wait for one replica at a time.
    # (bench.routing --quick: 2 blocks at 0.3 s raised the hit rate from 63% to 66% over 4 blocks at 0.1 s, with
    # TTFT p99 no worse.)
    min_wait_blocks: int = 2
    wait_per_block_s: float = 0.3
    max_affinity_wait_s: float = 3.0
    max_held_for_affinity: int = 4
    max_hold_s: float | None = None  # no hold once the request has been queued this long (None: no such bound)
    # Replicas fetch a prefix from its holder (replicas/kv_transfer.py): no hold for a holder that serves its
    # prefixes; the request goes where a slot is and takes the prefix along.
    kv_transfer: bool = True


def matched_blocks(request_hashes: list[str], *known: Container[str]) -> int:
    """Leading blocks of the request a replica holds. Hashes are chained, so the deepest hit implies the rest.

    (A replica reports only its most recent hashes, so a long-cached first block may be missing from the report
    while a later one is there.)
    """
    for depth in range(len(request_hashes), 0, -1):
        if any(request_hashes[depth - 1] in hashes for hashes in known):
            return depth
    return 0


def _load_key(replica: ReplicaView) -> tuple[float, float, float]:
    """Fewest waiting requests (counting what was sent since the report), then most free KV blocks."""
    assert replica.stats is not None  # ranked by load only when every replica has fresh stats
    waiting = replica.stats.num_waiting + replica.routed_since_report
    return (waiting, -replica.stats.num_free_blocks, replica.num_ongoing or 0)


def is_saturated(replica: ReplicaView) -> bool:
    """No slot there for this request: its ongoing requests, and those held for it since before this one (the
    next slots to free are theirs), fill it."""
    return replica.num_ongoing is not None and _free_slots(replica) == 0


def _free_slots(replica: ReplicaView) -> int:
    """Slots free there for this request (none promised to requests held for it since before)."""
    return max(0, replica.max_ongoing_requests - (replica.num_ongoing or 0) - replica.num_held_ahead)


def _overloaded_for_affinity(
    replica: ReplicaView, replicas: list[ReplicaView], num_new_blocks: int, policy: RoutingPolicy
) -> bool:
    """Whether a prefix hit is worth queueing behind this replica's load (it is not when it is saturated)."""
    if is_saturated(replica):
        return True
    num_waiting = replica.stats.num_waiting if replica.stats is not None else 0
    if num_waiting + replica.routed_since_report > policy.max_waiting_for_affinity:
        return True
    if replica.stats is not None and replica.stats.num_free_blocks < num_new_blocks:
        return True
    least_ongoing = min((r.num_ongoing or 0) for r in replicas)
    return (replica.num_ongoing or 0) - least_ongoing > policy.max_imbalance


def rank_replicas(
    replicas: list[ReplicaView],
    num_request_blocks: int,
    policy: RoutingPolicy = RoutingPolicy(),
    rng: random.Random | None = None,
    waited_s: float | None = None,
    queued_s: float | None = None,
    num_older_waiting: int = 0,
) -> list[tuple[list[str], str]]:
    """Replica ids in ranks, best first, each with why it is there (prefix_hit, least_loaded or fallback: a
    metric's label); Serve tries each rank in turn and skips replicas that refuse.

    1. Prefix affinity: the replica holding the longest leading run of the request's blocks, unless overloaded;
       of equally deep holders the shortest queue; none when every replica holds as much.
    2. Replicas with fresh stats: fewest waiting, then most free KV blocks (saturated ones last).
    3. Replicas whose stats are stale, missing or unreadable: power of two choices on ongoing requests.

    Except: a saturated replica holding the request's prefix `min_wait_blocks` or more deeper than any other, with a
    short queue, is the only rank (Serve backs off and asks again when it refuses; no rank at all while requests held
    for it since before this one wait: the slot is theirs first) while every other replica is saturated too, or the
    request has passed up a free replica (`waited_s`: for how long) for less than prefilling those blocks there
    would take. A replica whose free slots are promised to requests held for it since before this
    one is left out, so that the slot freeing there goes to them in turn; and while no more slots are free than
    requests queued before this one wait for any replica (`num_older_waiting`), it waits its turn: no ranks.
    """
    rng = rng or random.Random()
    if not replicas:
        return []
    shuffled = list(replicas)
    rng.shuffle(shuffled)  # ties go to a random replica, not always the first
    ranked: list[tuple[list[str], str]] = []
    holder = hold_replica(shuffled, policy, waited_s, queued_s)
    if holder is not None:
        # Offered only to the request held longest for it: Serve places a request on any replica it is offered that
        # has a slot, so a newer one offered it too would take the slot that frees there whenever it asked first.
        return [([holder.replica_id], "prefix_hit")] if holder.num_held_ahead == 0 else []
    if num_older_waiting and sum(_free_slots(r) for r in replicas) <= num_older_waiting:
        return []  # the free slots are for requests queued before this one: it waits its turn (Serve backs off)
    # The deepest match among replicas fit to take it; among equally deep ones (a hot prefix that spilled over,
    # a shared system prompt every replica holds) the least loaded, so affinity never piles onto one replica.
    fit = [
        r for r in shuffled
        if r.prefix_blocks >= policy.min_match_blocks
        and not _overloaded_for_affinity(r, replicas, num_request_blocks - r.prefix_blocks + 1, policy)
    ]  # fmt: skip
    if fit:
        best = min(fit, key=lambda r: (-r.prefix_blocks, _queue_length(r)))
        if best.prefix_blocks > min(r.prefix_blocks for r in shuffled):  # a hit elsewhere too is no reason
            ranked.append(([best.replica_id], "prefix_hit"))
            shuffled.remove(best)
    if not shuffled:
        return ranked
    # A replica whose next free slots are promised to requests held for it (its prefix's holders) is theirs: a
    # request that could go anywhere, or arrived later, must not take the slot as it frees (when it would get there
    # first: the held ones ask again only after a backoff). It waits for another, or its turn.
    shuffled = [r for r in shuffled if not (r.num_held_ahead > 0 and is_saturated(r))]
    fresh = [r for r in shuffled if r.stats is not None]
    if fresh:
        ordered = sorted(fresh, key=_load_key)
        ranked += [([r.replica_id], "least_loaded") for r in ordered if not is_saturated(r)]
        ranked += [([r.replica_id], "fallback") for r in ordered if is_saturated(r)]
    # Power of two choices over the rest (stale, missing or unreadable stats): after every fresh replica, so a
    # replica that stopped reporting (a stuck engine?) is a last resort, not a peer; or all of them when none is fresh.
    stale = [r for r in shuffled if r.stats is None]
    if stale:
        ranked.append(([r.replica_id for r in stale[:2]], "fallback"))
    if len(stale) > 2:
        ranked.append(([r.replica_id for r in stale[2:]], "fallback"))
    return ranked


def hold_replica(
    replicas: list[ReplicaView], policy: RoutingPolicy, waited_s: float | None, queued_s: float | None
) -> ReplicaView | None:
    """The saturated replica the request is held back for (it holds the prefix much deeper than the rest), if any."""
    if waited_s is None or not replicas:
        return None
    # Ties broken by id, not by the list's order: `choose_replicas` asks again over the unshuffled views and must get
    # the replica `rank_replicas` held the request for.
    holder = max(replicas, key=lambda r: (r.prefix_blocks, r.replica_id))
    return holder if _worth_waiting_for(holder, replicas, policy, waited_s, queued_s) else None


def _worth_waiting_for(
    holder: ReplicaView, replicas: list[ReplicaView], policy: RoutingPolicy, waited_s: float, queued_s: float | None
) -> bool:
    """Whether to hold the request for the saturated replica holding its prefix much deeper than the rest."""
    if holder.stats is None or not is_saturated(holder):
        return False
    if policy.kv_transfer and holder.stats.kv_transfer_address:
        return False  # another replica can fetch the prefix from it (milliseconds) rather than wait for a slot
    if policy.max_hold_s is not None and queued_s is not None and queued_s >= policy.max_hold_s:
        return False
    if holder.stats.num_waiting + holder.routed_since_report > policy.max_waiting_for_affinity:
        return False
    if holder.num_held >= policy.max_held_for_affinity:
        return False
    others = [r for r in replicas if r is not holder]
    saved_blocks = holder.prefix_blocks - max((r.prefix_blocks for r in others), default=0)
    if saved_blocks < policy.min_wait_blocks:
        return False
    measured_s = _measured_prefill_s_per_block(replicas)
    saved_s = saved_blocks * (measured_s if measured_s is not None else policy.wait_per_block_s)
    if measured_s is not None and queued_s is not None and queued_s >= saved_s:
        # Queued as long as the prefill it would save: no more holds, however the wait was spent. (Bounding only
        # each stretch with a free slot elsewhere let a request held while all were saturated pass up every slot
        # that freed elsewhere for another stretch: 3 s queued, the oldest request, for a 0.2-s prefill.)
        return False
    if all(is_saturated(r) for r in others):
        # Elsewhere it would queue too, and then prefill those blocks again: it waits for as long as that prefill
        # would take (then takes whichever slot frees first; waiting up to the cost of giving up is never worse than
        # twice the better choice), or without bound where no replica measured its prefill yet.
        return True
    return waited_s < min(policy.max_affinity_wait_s, saved_s)


def kv_source(replicas: list[ReplicaView], policy: RoutingPolicy) -> ReplicaView | None:
    """The replica to fetch the request's prefix from wherever it goes: the deepest holder that serves its
    prefixes (the receiver fetches only the blocks it lacks, so the choice of receiver does not matter)."""
    if not policy.kv_transfer:
        return None
    sources = [r for r in replicas if r.stats is not None and r.stats.kv_transfer_address]
    source = max(sources, key=lambda r: (r.prefix_blocks, r.replica_id), default=None)
    return source if source is not None and source.prefix_blocks >= policy.min_match_blocks else None


def _measured_prefill_s_per_block(replicas: list[ReplicaView]) -> float | None:
    """How long prefilling one block takes by the replicas' measured prefill cost (their mean); None if unmeasured."""
    measured = [r.stats.prefill_seconds_per_token * r.stats.block_size for r in replicas
                if r.stats is not None and r.stats.prefill_seconds_per_token > 0]  # fmt: skip
    return sum(measured) / len(measured) if measured else None


def _queue_length(replica: ReplicaView) -> int:
    """Ongoing requests as Serve counts them, plus what was sent since the replica's last report."""
    return (replica.num_ongoing or 0) + replica.routed_since_report
