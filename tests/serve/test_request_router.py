"""The KV-aware routing policy on fake replicas: prefix affinity, overload fallback, free blocks, stale stats."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import random
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest

from replicas.contract import RoutingStats, prefix_block_hashes
from router.request_router import KVAwareRequestRouter
from router.routing_policy import (
    ReplicaView,
    RoutingPolicy,
    hold_replica,
    kv_source,
    matched_blocks,
    rank_replicas,
)

HASHES = prefix_block_hashes(list(range(100, 100 + 16 * 6)), block_size=16, max_blocks=256)  # six chained hashes


def report(free: int = 100, waiting: int = 0, hashes: list[str] | None = None, age_s: float = 0.0,
           prefill_seconds_per_token: float = 0.0) -> RoutingStats:  # fmt: skip
    return RoutingStats(
        timestamp=time.time() - age_s, num_running=0, num_waiting=waiting, num_free_blocks=free, num_total_blocks=100,
        num_cached_blocks=0, block_size=16, num_requests_finished=0, prefix_cache_queries=0, prefix_cache_hits=0,
        kv_slots_allocated=0, kv_slots_live=0, num_generation_tokens=0, num_preemptions=0, pid=1,
        prefix_hashes=hashes or [], prefill_seconds_per_token=prefill_seconds_per_token,
    )  # fmt: skip


def stats(free: int = 100, waiting: int = 0, hashes: list[str] | None = None, age_s: float = 0.0) -> dict[str, Any]:
    """What Serve hands the router: the dict `LLMReplica.record_routing_stats` returned."""
    return report(free, waiting, hashes, age_s).to_dict()


def view(replica_id: str, *, prefix_blocks: int = 0, ongoing: int = 0, free: int = 100, waiting: int = 0,
         fresh: bool = True, max_ongoing: int = 8) -> ReplicaView:  # fmt: skip
    return ReplicaView(replica_id, max_ongoing, ongoing, report(free, waiting) if fresh else None, prefix_blocks)


def rank_ids(*args: Any, **kwargs: Any) -> list[list[str]]:
    """`rank_replicas` without the reasons."""
    return [rank for rank, _ in rank_replicas(*args, **kwargs)]


def first_choice(ranks: list[list[str]]) -> list[str]:
    return ranks[0]


def test_matched_blocks_counts_the_deepest_hit_since_hashes_are_chained() -> None:
    assert matched_blocks(HASHES, set()) == 0
    assert matched_blocks(HASHES, set(HASHES[:3])) == 3
    assert matched_blocks(HASHES, {HASHES[4]}) == 5  # earlier blocks fell out of the report window
    assert matched_blocks(HASHES, {HASHES[1]}, {HASHES[3]}) == 4


def test_prefix_holder_wins_over_an_emptier_replica() -> None:
    replicas = [view("a", free=100), view("b", prefix_blocks=4, free=20)]
    assert first_choice(rank_ids(replicas, num_request_blocks=6)) == ["b"]


def test_saturated_prefix_holder_is_passed_over() -> None:
    replicas = [view("a"), view("b", prefix_blocks=6, ongoing=8, max_ongoing=8)]
    ranks = rank_ids(replicas, num_request_blocks=6)
    assert first_choice(ranks) == ["a"]
    assert ranks[-1] == ["b"]  # still a last resort


def test_a_saturated_holder_of_a_much_deeper_prefix_is_waited_for_as_long_as_a_prefill_elsewhere() -> None:
    policy = RoutingPolicy(min_wait_blocks=4, wait_per_block_s=0.1, max_affinity_wait_s=3.0)
    replicas = [view("a", prefix_blocks=1), view("b", prefix_blocks=6, ongoing=8, max_ongoing=8)]
    assert rank_replicas(replicas, 6, policy, waited_s=0.4) == [(["b"], "prefix_hit")]  # only b: Serve retries
    assert first_choice(rank_ids(replicas, 6, policy, waited_s=0.5)) == ["a"]  # 5 blocks' prefill waited: spill
    assert first_choice(rank_ids(replicas, 6, policy)) == ["a"]  # how long it waited is unknown: spill
    deep = [view("a"), view("b", prefix_blocks=60, ongoing=8, max_ongoing=8)]
    assert rank_replicas(deep, 60, policy, waited_s=2.9) == [(["b"], "prefix_hit")]
    assert first_choice(rank_ids(deep, 60, policy, waited_s=3.0)) == ["a"]  # never past max_affinity_wait_s


def test_a_saturated_deep_holder_is_waited_for_while_every_other_replica_is_saturated_too() -> None:
    policy = RoutingPolicy(min_wait_blocks=4, wait_per_block_s=0.1, max_affinity_wait_s=3.0, max_held_for_affinity=2)
    busy = [view("a", prefix_blocks=1, ongoing=8, max_ongoing=8), view("b", prefix_blocks=6, ongoing=8, max_ongoing=8)]
    assert rank_replicas(busy, 6, policy, waited_s=100.0) == [(["b"], "prefix_hit")]
    crowded = [busy[0], ReplicaView("b", 8, 8, report(), prefix_blocks=6, num_held=2, num_held_ahead=2)]  # two wait
    assert rank_ids(crowded, 6, policy, waited_s=0.0) == [["a"]]  # not held: b's next slots go to those two


def test_holds_are_bounded_by_the_prefill_time_the_replicas_measured() -> None:
    """A fast replica (1 ms per token: 16 ms a block) makes a hit worth little waiting: the hold lasts as long as
    prefilling the saved blocks would take, while others are saturated too and once one has a free slot."""
    policy = RoutingPolicy(min_wait_blocks=4, wait_per_block_s=0.3, max_affinity_wait_s=3.0)

    def measured(replica_id: str, **kwargs: Any) -> ReplicaView:
        plain = view(replica_id, **kwargs)
        return ReplicaView(plain.replica_id, plain.max_ongoing_requests, plain.num_ongoing,
                           report(prefill_seconds_per_token=0.001), plain.prefix_blocks)  # fmt: skip

    busy = [measured("a", prefix_blocks=1, ongoing=8, max_ongoing=8), measured("b", prefix_blocks=11, ongoing=8,
                                                                                  max_ongoing=8)]  # fmt: skip
    # 10 saved blocks x 16 tokens x 1 ms = 0.16 s
    assert rank_replicas(busy, 11, policy, waited_s=0.0, queued_s=0.1) == [(["b"], "prefix_hit")]
    ranks = rank_ids(busy, 11, policy, waited_s=0.0, queued_s=0.2)
    assert sorted(ranks) == [["a"], ["b"]]  # no longer held: whichever slot frees first
    free_a = [measured("a", prefix_blocks=1), busy[1]]
    assert rank_replicas(free_a, 11, policy, waited_s=0.1) == [(["b"], "prefix_hit")]
    assert first_choice(rank_ids(free_a, 11, policy, waited_s=0.2)) == ["a"]  # 3 s with the unmeasured 0.3 s a block
    # Its budget is the time since it was queued, however spent: having waited out 0.16 s while every replica was
    # saturated, it is not held again for a fresh stretch when a slot frees elsewhere.
    assert first_choice(rank_ids(free_a, 11, policy, waited_s=0.0, queued_s=0.2)) == ["a"]
    assert rank_replicas(free_a, 11, policy, waited_s=0.0, queued_s=0.1) == [(["b"], "prefix_hit")]


def test_a_replica_with_requests_held_for_it_is_left_to_them_while_saturated() -> None:
    held_for_b = ReplicaView("b", 8, 8, report(), num_held=1, num_held_ahead=1)
    assert sum(rank_ids([view("a", ongoing=8, max_ongoing=8), held_for_b], 0), []) == ["a"]
    assert rank_ids([held_for_b], 0) == []  # every replica is one: it waits for its turn (Serve backs off)
    free_b = ReplicaView("b", 8, 3, report(), num_held=1, num_held_ahead=1)  # more slots free than held for it
    assert sorted(sum(rank_ids([view("a", ongoing=8, max_ongoing=8), free_b], 0), [])) == ["a", "b"]


def test_a_slot_freeing_on_a_replica_goes_to_the_request_held_longest_for_it_not_to_a_newcomer() -> None:
    """The tail bench.routing's trace showed: held requests ask again only after a backoff, so a request arriving
    as the slot freed took it, again and again, and one held request waited 22 s."""
    one_free = {"max_ongoing_requests": 8, "num_ongoing": 7, "stats": report()}
    newcomer = [view("a", ongoing=8, max_ongoing=8), ReplicaView("b", **one_free, num_held=2, num_held_ahead=2)]
    assert sum(rank_ids(newcomer, 0), []) == ["a"]
    second = [view("a", prefix_blocks=1, ongoing=8, max_ongoing=8),
              ReplicaView("b", **one_free, prefix_blocks=6, num_held=1, num_held_ahead=1)]  # fmt: skip
    # Held for b too, but queued after the first: not even b is offered (Serve would place it on b's free slot
    # whenever it asked before the first did, which the trace showed happening three times to one request).
    assert rank_replicas(second, 6, RoutingPolicy(min_wait_blocks=4), waited_s=0.0) == []
    assert hold_replica(second, RoutingPolicy(min_wait_blocks=4), 0.0, None) is second[1]  # still held for b
    first = [second[0], ReplicaView("b", **one_free, prefix_blocks=6, num_held=1, num_held_ahead=0)]
    assert first_choice(rank_ids(first, 6, RoutingPolicy(min_wait_blocks=4), waited_s=0.0)) == ["b"]


def test_max_hold_s_bounds_a_hold_by_the_time_since_the_request_was_queued() -> None:
    busy = [view("a", prefix_blocks=1, ongoing=8, max_ongoing=8), view("b", prefix_blocks=6, ongoing=8, max_ongoing=8)]
    policy = RoutingPolicy(min_wait_blocks=4, max_hold_s=5.0)
    assert rank_replicas(busy, 6, policy, waited_s=0.0, queued_s=4.9) == [(["b"], "prefix_hit")]
    assert sorted(sum(rank_ids(busy, 6, policy, waited_s=0.0, queued_s=5.0), [])) == ["a", "b"]  # whichever frees
    assert rank_replicas(busy, 6, RoutingPolicy(min_wait_blocks=4), waited_s=0.0, queued_s=500.0) == [
        (["b"], "prefix_hit")]  # the default: no bound


def test_a_request_waits_its_turn_while_the_free_slots_are_for_requests_queued_before_it() -> None:
    replicas = [view("a", ongoing=7), view("b", ongoing=8)]
    assert rank_ids(replicas, 0, num_older_waiting=1) == []
    assert sum(rank_ids([view("a", ongoing=6), view("b", ongoing=8)], 0, num_older_waiting=1), []) == ["a", "b"]


def test_a_saturated_holder_is_not_waited_for_when_the_match_is_shallow_or_its_queue_long() -> None:
    policy = RoutingPolicy(min_wait_blocks=4, max_waiting_for_affinity=2)
    shallow = [view("a", prefix_blocks=3), view("b", prefix_blocks=6, ongoing=8, max_ongoing=8)]
    assert first_choice(rank_ids(shallow, 6, policy, waited_s=0.0)) == ["a"]
    queued = [view("a"), view("b", prefix_blocks=6, ongoing=8, max_ongoing=8, waiting=3)]
    assert first_choice(rank_ids(queued, 6, policy, waited_s=0.0)) == ["a"]
    stale = [view("a"), view("b", prefix_blocks=6, ongoing=8, max_ongoing=8, fresh=False)]
    assert first_choice(rank_ids(stale, 6, policy, waited_s=0.0)) == ["a"]


def test_prefix_holder_with_a_long_queue_is_passed_over() -> None:
    replicas = [view("a"), view("b", prefix_blocks=6, waiting=9)]
    assert first_choice(rank_ids(replicas, 6, RoutingPolicy(max_waiting_for_affinity=8))) == ["a"]


def test_prefix_holder_much_busier_than_the_rest_is_passed_over() -> None:
    replicas = [view("a", ongoing=0, max_ongoing=64), view("b", prefix_blocks=6, ongoing=20, max_ongoing=64)]
    assert first_choice(rank_ids(replicas, 6, RoutingPolicy(max_imbalance=16))) == ["a"]


def test_prefix_holder_without_room_for_the_rest_of_the_prompt_is_passed_over() -> None:
    replicas = [view("a"), view("b", prefix_blocks=1, free=2)]
    assert first_choice(rank_ids(replicas, num_request_blocks=6)) == ["a"]


def test_without_a_prefix_hit_fewest_waiting_then_most_free_blocks_win() -> None:
    replicas = [view("a", free=10), view("b", free=90), view("c", free=95, waiting=2)]
    assert rank_ids(replicas, 0) == [["b"], ["a"], ["c"]]


def test_requests_sent_since_the_last_report_count_as_waiting() -> None:
    busy = ReplicaView("a", 8, 0, report(free=90), routed_since_report=3)
    assert first_choice(rank_ids([busy, view("b", free=50)], 0)) == ["b"]


def test_stale_stats_fall_back_to_power_of_two_choices() -> None:
    replicas = [view(name, fresh=False) for name in "abcd"]
    ranks = rank_ids(replicas, 0, rng=random.Random(0))
    assert len(ranks[0]) == 2  # Serve picks the one of the pair with fewer ongoing requests
    assert sorted(sum(ranks, [])) == ["a", "b", "c", "d"]


def test_of_equally_deep_holders_the_shorter_queue_wins() -> None:
    replicas = [view("a", prefix_blocks=4, ongoing=3), view("b", prefix_blocks=4, ongoing=1), view("c", ongoing=0)]
    assert rank_replicas(replicas, 6)[0] == (["b"], "prefix_hit")


def test_a_prefix_every_replica_holds_is_no_reason_to_prefer_one() -> None:
    replicas = [view("a", prefix_blocks=2, free=10), view("b", prefix_blocks=2, free=90)]
    assert rank_replicas(replicas, 6)[0] == (["b"], "least_loaded")


def test_ties_are_broken_at_random() -> None:
    replicas = [view("a"), view("b")]
    firsts = {first_choice(rank_ids(replicas, 0, rng=random.Random(seed)))[0] for seed in range(20)}
    assert firsts == {"a", "b"}


# --- the Serve RequestRouter subclass, on fake RunningReplicas -------------------------------------------------


@dataclass(frozen=True)
class FakeReplicaID:
    unique_id: str


@dataclass
class FakeReplica:
    name: str
    routing_stats: dict[str, Any] = field(default_factory=dict)
    max_ongoing_requests: int = 8

    @property
    def replica_id(self) -> FakeReplicaID:
        return FakeReplicaID(self.name)


class FakeQueueLengths:
    def __init__(self, lengths: dict[str, int]) -> None:
        self.lengths = lengths

    def get(self, replica_id: FakeReplicaID) -> int | None:
        return self.lengths.get(replica_id.unique_id)


_request_ids = itertools.count()


@dataclass
class FakePendingRequest:
    kwargs: dict[str, Any]
    # Serve's id for the request: the router keys its queue by it (without one, by `id()`, which a request created
    # after an earlier one was freed may reuse: the test then sees one request where it made two).
    metadata: Any = field(default_factory=lambda: SimpleNamespace(internal_request_id=f"req-{next(_request_ids)}"))
    args: list[Any] = field(default_factory=list)
    routing_context: Any = field(default_factory=lambda: type("Context", (), {"should_backoff": False})())
    created_at: float | None = None  # when Serve queued it (None: unknown)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)  # placed or cancelled: done


def make_router(queue_lengths: dict[str, int] | None = None, **state: Any) -> KVAwareRequestRouter:
    """The router's policy state without Serve's routing machinery (which needs a running controller)."""
    router = KVAwareRequestRouter.__new__(KVAwareRequestRouter)
    router.initialize_state(**state)
    router._replica_queue_len_cache = FakeQueueLengths(queue_lengths or {})
    return router


def choose(router: KVAwareRequestRouter, replicas: list[FakeReplica], hashes: list[str]) -> list[list[str]]:
    ranks = asyncio.run(router.choose_replicas(replicas, FakePendingRequest({"prefix_hashes": hashes})))
    return [[replica.name for replica in rank] for rank in ranks]


def test_router_sends_a_request_to_the_replica_reporting_its_prefix() -> None:
    replicas = [FakeReplica("a", stats(free=100)), FakeReplica("b", stats(free=10, hashes=HASHES[:3]))]
    assert choose(make_router(), replicas, HASHES)[0] == ["b"]


def test_router_remembers_where_it_just_sent_a_prefix_before_any_report_shows_it() -> None:
    router = make_router()
    replicas = [FakeReplica("a", stats(free=100)), FakeReplica("b", stats(free=10))]
    router.on_request_routed(FakePendingRequest({"prefix_hashes": HASHES[:2]}), FakeReplicaID("b"), None)
    assert choose(router, replicas, HASHES)[0] == ["b"]


def test_router_falls_back_when_the_prefix_holder_is_saturated_and_holding_is_off() -> None:
    router = make_router(queue_lengths={"a": 0, "b": 8}, max_affinity_wait_s=0.0)
    replicas = [FakeReplica("a", stats(free=100)), FakeReplica("b", stats(free=100, hashes=HASHES))]
    assert choose(router, replicas, HASHES)[0] == ["a"]


def test_router_ignores_stale_reports_for_load_but_uses_power_of_two() -> None:
    replicas = [FakeReplica(name, stats(age_s=60)) for name in "abc"]
    ranks = choose(make_router(), replicas, [])
    assert len(ranks[0]) == 2


def test_a_report_that_does_not_parse_counts_as_missing_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    renamed = stats(free=100)
    renamed["free_blocks"] = renamed.pop("num_free_blocks")  # a replica of another version
    replicas = [FakeReplica("a", renamed), FakeReplica("b", stats(free=10))]
    router = make_router()
    with caplog.at_level(logging.ERROR, logger="router.request_router"):
        ranks = choose(router, replicas, [])
        choose(router, replicas, [])
    assert ranks == [["b"], ["a"]]  # no fresh stats for "a": a last resort after "b", not a ranking on zeros
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and "replica a" in errors[0] and "free_blocks" in errors[0]


def test_stale_stats_are_warned_about_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    router = make_router()
    replica = FakeReplica("a", stats(age_s=60))
    with caplog.at_level(logging.WARNING, logger="router.request_router"):
        choose(router, [replica], [])
        choose(router, [replica], [])
        replica.routing_stats = stats()  # fresh again: the episode ends
        choose(router, [replica], [])
        replica.routing_stats = stats(age_s=60)
        choose(router, [replica], [])
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("replica a" in warning and "old" in warning for warning in warnings)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


def test_router_holds_a_request_for_its_saturated_deep_holder_while_all_are_busy_then_briefly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("router.request_router.time", clock)
    lengths = {"a": 8, "b": 8}
    router = make_router(queue_lengths=lengths, min_wait_blocks=4, max_affinity_wait_s=1.0)  # b holds 6 blocks
    replicas = [FakeReplica("a", stats()), FakeReplica("b", stats(hashes=HASHES))]
    pending = FakePendingRequest({"prefix_hashes": HASHES})

    def first() -> list[str]:
        for replica in replicas:  # fresh reports at the fake clock's time
            replica.routing_stats = {**replica.routing_stats, "timestamp": clock.now}
        return [replica.name for replica in asyncio.run(router.choose_replicas(replicas, pending))[0]]

    assert first() == ["b"]
    clock.now += 30.0
    assert first() == ["b"]  # every replica is busy: waiting elsewhere would cost the prefill on top
    lengths["a"] = 0  # a slot frees on the replica without the prefix: the hold's clock starts now
    assert first() == ["b"]
    clock.now += 0.8
    lengths["a"] = 8  # ... and another request took it: the clock stops (a taken slot was no idle capacity)
    assert first() == ["b"]
    lengths["a"] = 0
    assert first() == ["b"]
    clock.now += 0.5
    assert first() == ["b"]  # 1.3 s passed up in all, but only 0.5 s of it without a break
    clock.now += 0.6  # past max_affinity_wait_s with a free all along
    assert first() == ["a"]


def test_router_holds_at_most_max_held_for_affinity_requests_for_one_replica() -> None:
    router = make_router(queue_lengths={"a": 8, "b": 8}, min_wait_blocks=4, max_held_for_affinity=2)
    replicas = [FakeReplica("a", stats()), FakeReplica("b", stats(hashes=HASHES))]
    requests = [FakePendingRequest({"prefix_hashes": HASHES}) for _ in range(3)]
    ranks = [asyncio.run(router.choose_replicas(replicas, request)) for request in requests]
    assert [[[r.name for r in rank] for rank in ranking] for ranking in ranks[:2]] == [[["b"]], []]  # 2nd: its turn
    assert [[r.name for r in rank] for rank in ranks[2]] == [["a"]]  # not held: b's next slots go to those two
    router.on_request_routed(requests[0], FakeReplicaID("b"), None)  # one held request placed: room for another
    assert [[r.name for r in rank] for rank in asyncio.run(router.choose_replicas(replicas, requests[1]))] == [["b"]]
    assert asyncio.run(router.choose_replicas(replicas, requests[2])) == []  # held now, behind requests[1]


def test_a_freed_slot_goes_to_the_request_queued_first_not_to_one_that_arrived_as_it_freed() -> None:
    """Serve asks again about a request it could not place only after a backoff, while a new request is asked about
    at once: without a queue order the newcomers took every freed slot (bench.routing: one request waited 13 s
    while nine newer ones were placed)."""
    lengths = {"a": 8, "b": 8}
    router = make_router(queue_lengths=lengths)
    replicas = [FakeReplica("a", stats()), FakeReplica("b", stats())]
    old = FakePendingRequest({"prefix_hashes": []}, created_at=time.time() - 5)
    new = FakePendingRequest({"prefix_hashes": []}, created_at=time.time())

    def ask(request: FakePendingRequest) -> list[str]:
        ranks = asyncio.run(router.choose_replicas(replicas, request))
        return sorted(replica.name for rank in ranks for replica in rank)

    assert ask(old) == ["a", "b"]  # both full: Serve tries them, both refuse, it backs off
    lengths["a"] = 7  # a slot frees; the newcomer is asked about first
    assert ask(new) == []  # it is the old request's
    assert ask(old) == ["a", "b"]
    router.on_request_routed(old, FakeReplicaID("a"), None)
    lengths["a"] = 8
    assert ask(new) == ["a", "b"]  # first in line now (both full: Serve backs off)
    latest = FakePendingRequest({"prefix_hashes": []}, created_at=time.time() + 1)
    lengths["b"] = 7
    assert ask(latest) == []  # one slot free, and `new` waits ahead
    lengths["b"] = 6
    assert ask(latest) == ["a", "b"]  # two free, one request ahead: room for both


def test_of_two_requests_held_for_one_replica_only_the_first_is_offered_its_freed_slot() -> None:
    """bench.routing's trace: a request held 12.6 s for its replica while three requests held for it after it took
    the slots that freed there (each was offered the replica, and Serve places on any offered replica with room)."""
    lengths = {"a": 8, "b": 8}
    router = make_router(queue_lengths=lengths, min_wait_blocks=4)
    replicas = [FakeReplica("a", stats()), FakeReplica("b", stats(hashes=HASHES))]
    first = FakePendingRequest({"prefix_hashes": HASHES}, created_at=time.time() - 5)
    second = FakePendingRequest({"prefix_hashes": HASHES}, created_at=time.time())

    def ask(request: FakePendingRequest) -> list[list[str]]:
        return [[replica.name for replica in rank] for rank in asyncio.run(router.choose_replicas(replicas, request))]

    assert ask(first) == [["b"]]  # held for b: the only rank
    assert ask(second) == []  # held for b too, behind the first
    lengths["b"] = 7  # a slot frees on b; the second is asked about first
    assert ask(second) == []
    assert ask(first)[0] == ["b"]  # b has room for it: a plain prefix hit, first choice
    router.on_request_routed(first, FakeReplicaID("b"), None)
    lengths["b"] = 8
    assert ask(second) == [["b"]]  # first in line for b now


def test_a_waiting_request_serve_stopped_asking_about_holds_up_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("router.request_router.time", clock)
    lengths = {"a": 8}
    router = make_router(queue_lengths=lengths)
    replicas = [FakeReplica("a", stats())]
    asyncio.run(router.choose_replicas(replicas, FakePendingRequest({}, created_at=clock.now - 1)))  # then cancelled
    lengths["a"] = 7
    newcomer = FakePendingRequest({}, created_at=clock.now)
    assert asyncio.run(router.choose_replicas(replicas, newcomer)) == []  # the older one may still be asked again
    clock.now += 2.5
    replicas[0].routing_stats = stats() | {"timestamp": clock.now}
    assert [[r.name for r in rank] for rank in asyncio.run(router.choose_replicas(replicas, newcomer))] == [["a"]]
    assert len(router._waiting) == 1  # only the newcomer's entry is left


def test_a_waiting_request_its_caller_gave_up_on_holds_up_no_one() -> None:
    lengths = {"a": 8}
    router = make_router(queue_lengths=lengths)
    replicas = [FakeReplica("a", stats())]
    older = FakePendingRequest({}, created_at=time.time() - 1)
    asyncio.run(router.choose_replicas(replicas, older))
    lengths["a"] = 7
    newcomer = FakePendingRequest({}, created_at=time.time())
    assert asyncio.run(router.choose_replicas(replicas, newcomer)) == []
    older.future.cancel()  # the client went away: Serve cancels its placement
    assert [[r.name for r in rank] for rank in asyncio.run(router.choose_replicas(replicas, newcomer))] == [["a"]]


# --- waiting in the router for a slot, instead of Serve's backoff between asks -----------------------------------


def test_a_request_finding_every_replica_full_gets_the_slot_a_completion_frees_without_a_backoff() -> None:
    lengths = {"a": 8, "b": 8}
    router = make_router(queue_lengths=lengths, slot_wait_s=60.0)  # the completion, not the timeout, must end it
    replicas = [FakeReplica("a", stats()), FakeReplica("b", stats())]
    pending = FakePendingRequest({"prefix_hashes": HASHES})

    async def scenario() -> list[list[str]]:
        choosing = asyncio.create_task(router.choose_replicas(replicas, pending))
        await asyncio.sleep(0.05)
        assert not choosing.done()  # every replica is full: it waits in the router
        lengths["b"] = 7  # Serve's queue-length cache as a request on b completes ...
        router.on_request_completed(FakeReplicaID("b"), "done-request")  # ... and the router hears of it
        ranks = await asyncio.wait_for(choosing, timeout=10.0)
        return [[replica.name for replica in rank] for rank in ranks]

    assert asyncio.run(scenario())[0] == ["b"]
    assert pending.routing_context.should_backoff is False  # its wait was the backoff: Serve sends at once


def test_a_completion_that_frees_nothing_it_may_take_leaves_the_request_waiting_until_slot_wait_s() -> None:
    lengths = {"a": 8, "b": 8}
    router = make_router(queue_lengths=lengths, slot_wait_s=0.3)
    replicas = [FakeReplica("a", stats()), FakeReplica("b", stats())]
    pending = FakePendingRequest({"prefix_hashes": HASHES})

    async def scenario() -> list[list[str]]:
        choosing = asyncio.create_task(router.choose_replicas(replicas, pending))
        await asyncio.sleep(0.05)
        router.on_request_completed(FakeReplicaID("a"), "done-request")  # another request took the slot already
        await asyncio.sleep(0.05)
        assert not choosing.done()  # ranked again, still full: it goes on waiting
        return [[replica.name for replica in rank] for rank in await asyncio.wait_for(choosing, timeout=10.0)]

    started = time.monotonic()
    ranks = asyncio.run(scenario())
    assert time.monotonic() - started >= 0.3  # until the bound, then Serve tries the (full) ranks and asks again
    assert sorted(name for rank in ranks for name in rank) == ["a", "b"]
    assert pending.routing_context.should_backoff is False
    assert not router._slot_waiters  # nothing left registered


def test_a_request_with_a_free_slot_among_its_ranks_does_not_wait() -> None:
    router = make_router(queue_lengths={"a": 8, "b": 3}, slot_wait_s=60.0)
    replicas = [FakeReplica("a", stats()), FakeReplica("b", stats())]
    pending = FakePendingRequest({"prefix_hashes": HASHES})
    ranks = asyncio.run(asyncio.wait_for(router.choose_replicas(replicas, pending), timeout=10.0))
    assert [replica.name for replica in ranks[0]] == ["b"]
    assert pending.routing_context.should_backoff is True  # a refusal (stale cache) backs off as before


def test_a_request_held_for_its_prefix_holder_is_ranked_again_while_it_waits_and_released_at_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hold ends at a time no completion marks: the held request is re-ranked every few tens of milliseconds."""
    clock = FakeClock()
    monkeypatch.setattr("router.request_router.time", clock)
    lengths = {"a": 0, "b": 8}
    router = make_router(queue_lengths=lengths, min_wait_blocks=4, max_affinity_wait_s=1.0, slot_wait_s=60.0)
    replicas = [FakeReplica("a", stats(age_s=0.0)), FakeReplica("b", stats(hashes=HASHES))]
    for replica in replicas:
        replica.routing_stats = {**replica.routing_stats, "timestamp": clock.now}
    pending = FakePendingRequest({"prefix_hashes": HASHES})

    async def scenario() -> list[str]:
        choosing = asyncio.create_task(router.choose_replicas(replicas, pending))
        await asyncio.sleep(0.2)
        assert not choosing.done()  # held for b (a's free slot passed up) ...
        clock.now += 1.1  # ... until the hold's bound passes, which no completion marks
        ranks = await asyncio.wait_for(choosing, timeout=10.0)
        return [replica.name for replica in ranks[0]]

    assert asyncio.run(scenario()) == ["a"]


def serving(replica_view: ReplicaView, address: str) -> ReplicaView:
    """The view of a replica that serves its cached prefixes to the others at `address`."""
    return replace(replica_view, stats=replace(replica_view.stats, kv_transfer_address=address))


def test_a_saturated_holder_that_serves_its_prefixes_is_not_waited_for() -> None:
    """The request goes where a slot is and fetches the prefix there: no hold, unless kv transfer is off."""
    policy = RoutingPolicy(min_wait_blocks=4, wait_per_block_s=0.1)
    holder = view("b", prefix_blocks=6, ongoing=8, max_ongoing=8)
    replicas = [view("a", prefix_blocks=1), serving(holder, "127.0.0.1:5001")]
    assert first_choice(rank_ids(replicas, 6, policy, waited_s=0.0)) == ["a"]
    assert kv_source(replicas, policy).replica_id == "b"
    no_transfer = replace(policy, kv_transfer=False)
    assert rank_replicas(replicas, 6, no_transfer, waited_s=0.0) == [(["b"], "prefix_hit")]
    assert kv_source(replicas, no_transfer) is None
    # A holder that does not serve its prefixes (kv transfer off there) is still waited for.
    assert rank_replicas([replicas[0], holder], 6, policy, waited_s=0.0) == [(["b"], "prefix_hit")]


def test_the_prefix_source_is_the_deepest_holder_that_serves_its_prefixes() -> None:
    policy = RoutingPolicy(min_match_blocks=2)
    replicas = [serving(view("a", prefix_blocks=3), "127.0.0.1:1"), serving(view("b", prefix_blocks=5), "127.0.0.1:2"),
                view("c", prefix_blocks=9)]  # fmt: skip
    assert kv_source(replicas, policy).replica_id == "b"  # c holds more but does not serve it
    shallow = [serving(view("a", prefix_blocks=1), "127.0.0.1:1"), view("b")]
    assert kv_source(shallow, policy) is None  # below min_match_blocks: not worth a fetch
    assert kv_source([view("a", prefix_blocks=4, fresh=False)], policy) is None  # no stats: no address


def test_router_tells_the_replica_where_to_fetch_the_prefix_wherever_it_goes() -> None:
    router = make_router(queue_lengths={"a": 0, "b": 8})
    holder_stats = replace(report(hashes=HASHES), kv_transfer_address="127.0.0.1:7000").to_dict()
    replicas = [FakeReplica("a", stats()), FakeReplica("b", holder_stats)]
    request = FakePendingRequest({"prefix_hashes": HASHES, "kv_source": {"stale": True}})
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    assert [replica.name for replica in ranks[0]] == ["a"]  # b is saturated: no hold, a fetches from it
    assert request.kwargs["kv_source"] == {"address": "127.0.0.1:7000", "num_blocks": len(HASHES)}
    nothing_cached = FakePendingRequest({"prefix_hashes": ["f" * 32], "kv_source": {"stale": True}})
    asyncio.run(router.choose_replicas(replicas, nothing_cached))
    assert "kv_source" not in nothing_cached.kwargs
