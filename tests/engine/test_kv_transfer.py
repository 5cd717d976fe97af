"""A cached prefix moved from one engine to another (replicas/kv_transfer.py): the importing engine finds it like any
prefix-cache hit and generates exactly what it would have after computing the prefix itself; blocks evicted while
they are copied out are cut off; nothing is leaked or double-counted; the TCP transfer delivers the same tensors."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import pytest
import torch

from replicas import LLMEngine
from replicas.kv_transfer import (
    KVTransferServer,
    PrefixKV,
    export_prefix,
    fetch_prefix,
    free_port_address,
    import_prefix,
)
from tests.engine.helpers import greedy, make_engine, random_prompts, run_to_completion

BLOCK_SIZE = 8


def engine_with(model_dir: Path, **kwargs: object) -> LLMEngine:
    return make_engine(model_dir, num_threads=1, block_size=BLOCK_SIZE, enable_prefix_caching=True, **kwargs)


def generate(engine: LLMEngine, request_id: str, prompt: list[int], max_tokens: int = 12) -> list[int]:
    engine.add_request(request_id, prompt_token_ids=prompt, params=greedy(max_tokens))
    return run_to_completion(engine)[request_id][0]


def bookkeeping(engine: LLMEngine) -> tuple[int, int, int]:
    manager = engine.block_manager
    return manager.num_free_blocks, manager.num_cached_free_blocks, manager.num_live_slots


@pytest.fixture(scope="module")
def holder(tiny_llama_dir: Path) -> tuple[LLMEngine, list[int]]:
    """An engine that computed a 61-token prompt (7 full blocks cached)."""
    engine = engine_with(tiny_llama_dir)
    prompt = random_prompts(1, 61, 61, seed=3)[0]
    generate(engine, "first", prompt)
    return engine, prompt


def test_imported_prefix_is_a_cache_hit_with_the_same_greedy_output(tiny_llama_dir: Path, holder) -> None:
    source, prompt = holder
    follow_up = prompt + random_prompts(1, 20, 20, seed=4)[0]
    prefix = export_prefix(source, follow_up, start_block=0, max_blocks=64)
    assert prefix is not None and prefix.start_block == 0 and prefix.num_blocks == len(prompt) // BLOCK_SIZE

    receiver = engine_with(tiny_llama_dir)
    before = bookkeeping(receiver)
    assert import_prefix(receiver, follow_up, prefix) == prefix.num_blocks
    free, cached, live = bookkeeping(receiver)
    assert (free, cached, live) == (before[0], before[1] + prefix.num_blocks, before[2])  # free and cached, not live
    assert receiver.stats().num_imported_tokens == prefix.num_blocks * BLOCK_SIZE

    imported_run = generate(receiver, "follow-up", follow_up)
    stats = receiver.stats()
    assert stats.prefix_cache_hits == prefix.num_blocks * BLOCK_SIZE
    assert stats.num_prompt_tokens == len(follow_up) - prefix.num_blocks * BLOCK_SIZE  # only the rest computed
    fresh = engine_with(tiny_llama_dir)
    assert imported_run == generate(fresh, "follow-up", follow_up)


def test_only_the_missing_blocks_are_fetched_and_chained_on(tiny_llama_dir: Path, holder) -> None:
    source, prompt = holder
    receiver = engine_with(tiny_llama_dir)
    generate(receiver, "shorter", prompt[:3 * BLOCK_SIZE + 1])  # caches blocks 0-2 of the same prompt
    have = len(receiver.block_manager.prefix_cache.cached_run(prompt, 64))
    assert have == 3
    prefix = export_prefix(source, prompt, start_block=have, max_blocks=64)
    assert prefix is not None and prefix.start_block == 3 and prefix.num_blocks == len(prompt) // BLOCK_SIZE - 3
    assert import_prefix(receiver, prompt, prefix) == prefix.num_blocks
    assert len(receiver.block_manager.prefix_cache.cached_run(prompt, 64)) == len(prompt) // BLOCK_SIZE
    hits_before = receiver.stats().prefix_cache_hits
    assert generate(receiver, "full", prompt) == generate(engine_with(tiny_llama_dir), "full", prompt)
    # At least one token is always computed: the last full block is a hit only if a token follows it.
    assert receiver.stats().prefix_cache_hits - hits_before == (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_blocks_that_no_longer_chain_on_are_not_imported(tiny_llama_dir: Path, holder) -> None:
    """A prefix starting past what the receiver holds (its blocks were evicted meanwhile) imports nothing."""
    source, prompt = holder
    receiver = engine_with(tiny_llama_dir)
    prefix = export_prefix(source, prompt, start_block=2, max_blocks=64)
    assert prefix is not None
    before = bookkeeping(receiver)
    assert import_prefix(receiver, prompt, prefix) == 0
    assert bookkeeping(receiver) == before and not receiver.block_manager.prefix_cache.cached_block_ids


def test_a_cache_of_another_layout_is_refused_before_anything_changes(tiny_llama_dir: Path, holder) -> None:
    source, prompt = holder
    prefix = export_prefix(source, prompt, start_block=0, max_blocks=64)
    receiver = engine_with(tiny_llama_dir)
    before = bookkeeping(receiver)
    wrong = PrefixKV(0, prefix.keys.bfloat16(), prefix.values.bfloat16())
    with pytest.raises(ValueError, match="do not fit this cache"):
        import_prefix(receiver, prompt, wrong)
    with pytest.raises(ValueError, match="do not fit this cache"):
        import_prefix(receiver, prompt, PrefixKV(0, prefix.keys[:-1], prefix.values[:-1]))  # a layer short
    assert bookkeeping(receiver) == before and not receiver.block_manager.prefix_cache.cached_block_ids


def test_blocks_evicted_while_copied_out_are_cut_off(holder) -> None:
    source, prompt = holder
    manager = source.block_manager
    run = manager.prefix_cache.cached_run(prompt, 64)
    assert manager.prefix_cache.still_held(run) == len(run)
    # A block taken again (evicted, about to be overwritten) bumps its generation: from there on the run is cut.
    block = manager.blocks[run[4][0]]
    block.generation += 1
    try:
        assert manager.prefix_cache.still_held(run) == 4
    finally:
        block.generation -= 1


def test_import_stops_when_no_block_is_free(tiny_llama_dir: Path, holder) -> None:
    source, prompt = holder
    prefix = export_prefix(source, prompt, start_block=0, max_blocks=64)
    receiver = engine_with(tiny_llama_dir)
    manager = receiver.block_manager
    manager.num_total_blocks = 3  # a full cache: only three blocks exist
    assert import_prefix(receiver, prompt, prefix) == 3
    assert len(manager.prefix_cache.cached_run(prompt, 64)) == 3


def test_transfer_over_tcp_delivers_what_export_gives(holder) -> None:
    source, prompt = holder
    server = KVTransferServer(partial(export_prefix, source))
    try:
        fetched = asyncio.run(fetch_prefix(server.address, prompt, 2, 64, timeout_s=30))
        expected = export_prefix(source, prompt, 2, 64)
        assert fetched is not None and fetched.start_block == 2
        assert torch.equal(fetched.keys, expected.keys) and torch.equal(fetched.values, expected.values)
        assert asyncio.run(fetch_prefix(server.address, [1, 2, 3] * 9, 0, 64, timeout_s=30)) is None  # not cached
        assert server.num_exported_blocks == expected.num_blocks
    finally:
        server.close()
    # Nobody listening: no prefix, promptly.
    assert asyncio.run(fetch_prefix(free_port_address(), prompt, 0, 64, timeout_s=30)) is None
