"""Known failure patterns of prefix routers, each shown absent on the router with fake replicas (no Ray).

(a) a miss that keeps going to one replica; (b) a hot prefix overloading its replica while others idle; (c) a chat
matched by its first message only; (d) a replica whose stats stopped arriving still preferred; (e) router memory
growing with the number of distinct prefixes. Plus: the predicted-hit tokens counted per routing decision.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

import router.request_router as request_router
from replicas.contract import prefix_block_hashes
from tests.serve.test_request_router import FakePendingRequest, FakeReplica, FakeReplicaID, make_router, stats

BLOCK = 16


def hashes_of(token_ids: list[int]) -> list[str]:
    return prefix_block_hashes(token_ids, block_size=BLOCK, max_blocks=256)


def distinct_prompt(seed: int, blocks: int = 4) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(blocks * BLOCK)]


def route(router: request_router.KVAwareRequestRouter, replicas: list[FakeReplica], hashes: list[str],
          ongoing: dict[str, int] | None = None) -> str:  # fmt: skip
    """Rank, then place the request on the first offered replica as Serve would (bumping its queue length)."""
    pending = FakePendingRequest({"prefix_hashes": hashes})
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    first = min(ranks[0], key=lambda replica: (ongoing or {}).get(replica.name, 0)).name  # power of two picks
    router.on_request_routed(pending, FakeReplicaID(first), None)
    if ongoing is not None:
        ongoing[first] = ongoing.get(first, 0) + 1
    return first


@pytest.mark.parametrize("fresh", [True, False])
def test_a_misses_new_prefixes_spread_over_replicas_not_to_the_one_that_missed(fresh: bool) -> None:
    # Reports that never change (the replicas are slow to report): only the router's own bookkeeping spreads.
    replicas = [FakeReplica(name, stats(free=100, age_s=0 if fresh else 60)) for name in "abc"]
    ongoing: dict[str, int] = {}
    router = make_router(queue_lengths=ongoing)
    router._rng = random.Random(0)
    first = route(router, replicas, hashes_of(distinct_prompt(0)), ongoing)
    placed = Counter(route(router, replicas, hashes_of(distinct_prompt(seed)), ongoing) for seed in range(1, 31))
    assert set(placed) == {"a", "b", "c"}, placed
    assert placed[first] <= 12, placed  # an even share is 10


def test_b_a_hot_prefix_spills_to_idle_replicas_once_its_holder_is_loaded() -> None:
    hot = hashes_of(distinct_prompt(1, blocks=8))
    replicas = [FakeReplica("a", stats(hashes=hot)), FakeReplica("b", stats()), FakeReplica("c", stats())]
    ongoing = {"a": 0, "b": 0, "c": 0}
    router = make_router(queue_lengths=ongoing)  # none finishes here: each placed stays ongoing; 12 < the 24 slots
    placed = Counter(route(router, replicas, hot + hashes_of(distinct_prompt(100 + i))[8:], ongoing)
                     for i in range(12))  # fmt: skip
    assert placed["a"] >= 5, placed  # affinity still holds while the holder has room
    assert max(ongoing.values()) - min(ongoing.values()) <= router._policy.max_imbalance + 1, ongoing
    assert max(ongoing.values()) / (sum(ongoing.values()) / 3) <= 1.5, ongoing


def test_c_a_chat_is_matched_on_its_whole_conversation_not_its_first_message() -> None:
    system_and_first = distinct_prompt(2, blocks=4)  # the shared system prompt and first user message
    chat_1 = system_and_first + distinct_prompt(3, blocks=3)  # diverging after the first answer
    chat_2 = system_and_first + distinct_prompt(4, blocks=3)
    replicas = [FakeReplica(name, stats()) for name in "ab"]
    router = make_router(queue_lengths={"a": 1, "b": 0})
    router.on_request_routed(FakePendingRequest({"prefix_hashes": hashes_of(chat_1)}), FakeReplicaID("a"), None)
    router.on_request_routed(FakePendingRequest({"prefix_hashes": hashes_of(chat_2)}), FakeReplicaID("b"), None)
    for chat, holder in ((chat_1, "a"), (chat_2, "b")):
        next_turn = hashes_of(chat + distinct_prompt(5, blocks=2))
        pending = FakePendingRequest({"prefix_hashes": next_turn})
        ranks = asyncio.run(router.choose_replicas(replicas, pending))
        assert [replica.name for replica in ranks[0]] == [holder]


def test_d_a_replica_whose_stats_stopped_arriving_is_not_preferred() -> None:
    prompt = hashes_of(distinct_prompt(6))
    replicas = [FakeReplica("a", stats(hashes=prompt, age_s=60)), FakeReplica("b", stats()), FakeReplica("c", stats())]
    ranks = asyncio.run(make_router().choose_replicas(replicas, FakePendingRequest({"prefix_hashes": prompt})))
    names = [[replica.name for replica in rank] for rank in ranks]
    assert sorted(names[0] + names[1]) == ["b", "c"] and names[-1] == ["a"], names  # the stale one last


def test_d_what_was_routed_to_a_replica_attracts_only_until_its_ttl() -> None:
    prompt = hashes_of(distinct_prompt(7))
    replicas = [FakeReplica("a", stats(free=10)), FakeReplica("b", stats(free=100))]
    router = make_router(recent_route_ttl_s=0.0)
    router.on_request_routed(FakePendingRequest({"prefix_hashes": prompt}), FakeReplicaID("a"), None)
    ranks = asyncio.run(router.choose_replicas(replicas, FakePendingRequest({"prefix_hashes": prompt})))
    assert [replica.name for replica in ranks[0]] == ["b"]  # "a" has not reported it: forgotten


def test_e_router_memory_stays_bounded_under_a_stream_of_distinct_prefixes() -> None:
    bound = 64
    replicas = [FakeReplica(name, stats()) for name in "abcd"]
    router = make_router(max_recent_routes=bound)
    for seed in range(1500):
        hashes = hashes_of(distinct_prompt(seed, blocks=3))
        if seed % 3:
            route(router, replicas, hashes)
        else:  # ranked, never placed (the caller gave up: Serve cancels the placement's future)
            abandoned = FakePendingRequest({"prefix_hashes": hashes})
            asyncio.run(router.choose_replicas(replicas, abandoned))
            abandoned.future.cancel()
    assert all(len(recent) <= bound for recent in router._recent_routes.values())
    assert len(router._routing_reasons) <= bound and len(router._waiting) <= bound
    assert set(router._routed_since_report) <= set("abcd") and set(router._reports) <= set("abcd")


def test_each_decision_counts_the_prefix_tokens_expected_on_the_chosen_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counted: list[int] = []
    monkeypatch.setattr(request_router, "record_predicted_hit_tokens", lambda tokens, app: counted.append(tokens))
    monkeypatch.setattr(request_router, "start_predicted_hit_series", lambda app: None)
    monkeypatch.setattr(request_router, "record_routing_decision", lambda reason, app: None)
    prompt = hashes_of(distinct_prompt(8, blocks=6))
    replicas = [FakeReplica("a", stats(hashes=prompt[:3])), FakeReplica("b", stats())]
    router = make_router()
    assert route(router, replicas, prompt) == "a"
    assert counted == [3 * BLOCK]
