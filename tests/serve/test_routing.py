"""Two replicas: both serve, a shared prefix sticks to one, a disconnect frees the KV blocks, queues are bounded."""

from __future__ import annotations

import asyncio
import random

import httpx

from replicas.contract import prefix_block_hashes
from tests.serve.conftest import TINY_MAX_NUM_SEQS, TINY_MAX_QUEUED, ServedApp, replica_stats, run, wait_until


def finished_per_replica(app: str) -> dict[str, int]:
    return {name: stats["num_requests_finished"] for name, stats in replica_stats(app).items()}


def idle(app: str) -> bool:
    """Every replica has nothing running or waiting and all its KV blocks free (cached prefixes count as free)."""
    stats = replica_stats(app).values()
    return all(s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]
               for s in stats)  # fmt: skip


def random_ids(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(count)]


async def complete(client: httpx.AsyncClient, prompt: list[int], max_tokens: int = 2) -> dict:
    response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()


def test_both_replicas_serve(tiny_app: ServedApp) -> None:
    wait_until(lambda: len(replica_stats("tiny")) == 2)
    wait_until(lambda: idle("tiny"))
    before = finished_per_replica("tiny")

    async def wave(first_seed: int) -> None:
        async with httpx.AsyncClient(base_url=tiny_app.base_url, timeout=60) as client:
            # Short prompts (no full block, so no prefix to follow): spread by load. No more at once than the
            # caller's queue holds: Serve counts a request as queued until the router has placed it, so a larger
            # burst can be refused (429) on a loaded machine before any replica is busy.
            prompts = [random_ids(8, seed) for seed in range(first_seed, first_seed + TINY_MAX_QUEUED)]
            await asyncio.gather(*(complete(client, prompt, max_tokens=30) for prompt in prompts))

    def both_served() -> bool:
        after = finished_per_replica("tiny")
        return len(after) == 2 and all(after[name] > before.get(name, 0) for name in after)

    # Concurrent routing decisions may tie on a loaded machine; a router that spreads load serves both replicas
    # within a few waves, one that always picks the same replica never does.
    for first_seed in range(0, 6 * TINY_MAX_QUEUED, TINY_MAX_QUEUED):
        run(wave(first_seed))
        if both_served():
            break
    assert both_served(), (before, finished_per_replica("tiny"))


def test_requests_sharing_a_prefix_land_on_the_same_replica(tiny_app: ServedApp) -> None:
    shared = random_ids(16 * 8, seed=99)  # eight full blocks
    before = finished_per_replica("tiny")

    async def sequence() -> list[dict]:
        async with httpx.AsyncClient(base_url=tiny_app.base_url, timeout=60) as client:
            first = await complete(client, shared + random_ids(5, seed=0))
            return [first] + [await complete(client, shared + random_ids(5, seed=i)) for i in range(1, 7)]

    results = run(sequence())
    after = finished_per_replica("tiny")
    served = {name: after[name] - before.get(name, 0) for name in after}
    # NOTE: with the prefix transfer on, a holder whose last routing report still shows the previous request
    # running may look busy, and the router then sends the request elsewhere with the holder's address (it fetches
    # the prefix): seen once in ~10 runs on a loaded machine (2 of 7 elsewhere). The holder still serves most, and
    # every follow-up finds the prefix cached wherever it ran.
    assert sum(served.values()) == 7 and max(served.values()) >= 5, served
    for result in results[1:]:
        assert result["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16 * 8


def test_requests_past_a_busy_prefix_holder_fetch_its_prefix_and_generate_the_same(tiny_app: ServedApp) -> None:
    """Once the replica holding a prefix is saturated, the router sends the rest elsewhere and tells that replica
    where the prefix is: it fetches the blocks (replicas/kv_transfer.py) instead of computing them, and generates
    exactly what the holder does."""
    wait_until(lambda: idle("tiny"))
    prompt = random_ids(16 * 8 + 5, seed=123)  # eight full blocks
    imported_before = sum(stats.get("num_imported_tokens", 0) for stats in replica_stats("tiny").values())

    def holder_full() -> bool:
        return any(stats["num_running"] == TINY_MAX_NUM_SEQS for stats in replica_stats("tiny").values())

    async def waves() -> list[dict]:
        async with httpx.AsyncClient(base_url=tiny_app.base_url, timeout=120) as client:
            await complete(client, prompt, max_tokens=2)
            # Once the holder reports the prefix, a first wave follows it there and fills its slots ...
            await asyncio.to_thread(wait_until, lambda: any(
                first_block in stats["prefix_hashes"] for stats in replica_stats("tiny").values()))
            first_wave = [asyncio.create_task(complete(client, prompt, max_tokens=300))
                          for _ in range(TINY_MAX_NUM_SEQS)]  # fmt: skip
            await asyncio.to_thread(wait_until, holder_full)
            # ... and the next requests go to the other replica, which fetches the prefix.
            second_wave = [complete(client, prompt, max_tokens=300) for _ in range(2)]
            return await asyncio.gather(*first_wave, *second_wave)

    first_block = prefix_block_hashes(prompt, 16, 1)[0]
    results = run(waves())
    texts = {result["choices"][0]["text"] for result in results}
    assert len(texts) == 1, texts  # greedy: the same continuation on either replica
    assert all(r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16 * 8 for r in results)
    imported = sum(stats.get("num_imported_tokens", 0) for stats in replica_stats("tiny").values()) - imported_before
    assert imported >= 16 * 8, imported  # the replica that did not hold the prefix fetched all eight blocks
    wait_until(lambda: idle("tiny"), timeout_s=60)


def test_client_disconnect_mid_stream_aborts_and_frees_the_blocks(tiny_app: ServedApp) -> None:
    wait_until(lambda: idle("tiny"))
    before = finished_per_replica("tiny")
    body = {"prompt": random_ids(40, seed=5), "max_tokens": 900, "ignore_eos": True, "stream": True}
    chunks = 0
    with httpx.Client(base_url=tiny_app.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:
                    break  # leaving the block closes the connection mid-stream
    assert chunks == 3
    wait_until(lambda: idle("tiny"), timeout_s=30)
    # Aborted, not run to the end: no replica counts it as finished.
    assert finished_per_replica("tiny") == before


def test_full_queues_answer_429_with_retry_after_then_recover(tiny_app: ServedApp) -> None:
    wait_until(lambda: idle("tiny"))
    capacity = 2 * TINY_MAX_NUM_SEQS + TINY_MAX_QUEUED
    # Long requests (seconds each) sent at once, three times what the slots and the queue hold.
    body = {"prompt": random_ids(8, seed=11), "max_tokens": 900, "ignore_eos": True}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tiny_app.base_url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(3 * capacity)))

    responses = run(flood())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    rejected = [response for response in responses if response.status_code == 429]
    assert rejected, "no request was refused: the queues are not bounded"
    # NOTE: not `>= capacity` accepted: Serve counts a request as queued until its router has placed it, so a burst
    # can be refused before every slot is busy (ray/serve/_private/router.py, wrap_request_assignment).
    assert 200 in statuses, statuses
    assert int(rejected[0].headers["Retry-After"]) >= 1
    assert rejected[0].json()["error"]["type"] == "rate_limit_exceeded"
    wait_until(lambda: idle("tiny"), timeout_s=60)
    after = httpx.post(f"{tiny_app.v1}/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60)
    assert after.status_code == 200
