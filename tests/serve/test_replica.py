"""`LLMReplica` in-process (no Ray): streamed deltas, routing stats whose hashes match the router's, health check."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from replicas import SamplingParams
from replicas.contract import ModelInfo, RequestRejectedError, RoutingStats, prefix_block_hashes
from replicas.deployment import EngineUnhealthyError, LLMReplica
from replicas.kv_transfer import free_port_address
from tests.serve.conftest import wait_until


@pytest.fixture
def replica(tiny_llama_dir: Path):
    instance = LLMReplica.func_or_class(
        {"model": str(tiny_llama_dir), "kv_cache_memory_bytes": 4 * 2**20, "num_threads": 1}, stall_timeout_s=5.0
    )
    yield instance
    instance.shutdown()


def generate(replica, prompt: list[int], max_tokens: int, request_id: str = "r1", **kwargs: object) -> list:
    async def collect() -> list:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [output async for output in replica.generate(request_id, prompt, params, prefix_hashes=[], **kwargs)]

    return asyncio.run(collect())


def test_generate_streams_deltas_with_the_prompt_in_the_first_only(replica) -> None:
    prompt = list(range(100, 120))
    outputs = generate(replica, prompt, max_tokens=5)
    assert sum(len(output.outputs[0].token_ids) for output in outputs) == 5
    assert all(output.outputs[0].token_ids for output in outputs)
    assert outputs[0].prompt_token_ids == prompt
    assert all(output.prompt_token_ids == [] for output in outputs[1:])
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
    assert replica.stream_counters() == {"messages": len(outputs), "tokens": 5}


def test_streams_over_the_message_rate_get_merged_deltas(tiny_llama_dir: Path) -> None:
    config = {"model": str(tiny_llama_dir), "kv_cache_memory_bytes": 4 * 2**20, "num_threads": 1}
    capped = LLMReplica.func_or_class(config, stream_messages_per_s=4.0)  # one message per 0.25 s per stream
    uncapped = LLMReplica.func_or_class(config, stream_messages_per_s=None)
    try:
        prompt = list(range(300, 316))
        merged, plain = generate(capped, prompt, max_tokens=40), generate(uncapped, prompt, max_tokens=40)
        assert len(merged) < 40 and any(len(output.outputs[0].token_ids) > 1 for output in merged)
        tokens = [token for output in merged for token in output.outputs[0].token_ids]
        assert tokens == [token for output in plain for token in output.outputs[0].token_ids]
        assert "".join(o.outputs[0].text for o in merged) == "".join(o.outputs[0].text for o in plain)
        assert capped.stream_counters() == {"messages": len(merged), "tokens": 40}
    finally:
        capped.shutdown()
        uncapped.shutdown()


def test_reported_prefix_hashes_are_the_ones_the_router_computes(replica) -> None:
    prompt = list(range(200, 200 + 16 * 3 + 5))  # three full blocks
    generate(replica, prompt, max_tokens=1)
    stats = RoutingStats.from_dict(replica.record_routing_stats())
    block_size = ModelInfo.from_dict(replica.model_info()).block_size
    assert set(prefix_block_hashes(prompt, block_size, max_blocks=256)) <= set(stats.prefix_hashes)
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_running == stats.num_waiting == 0
    assert time.time() - stats.timestamp < 5


def test_model_info_reports_what_the_ingress_validates_against(replica) -> None:
    info = ModelInfo.from_dict(replica.model_info())
    assert info.max_model_len == 1024 and info.block_size == 16 and info.max_num_seqs == 64
    assert info.enable_prefix_caching and info.num_total_blocks > 0


def test_priority_reaches_the_engine(replica) -> None:
    seen: list[int] = []
    engine_generate = replica.engine.generate

    def generate_spy(*args, **kwargs):
        seen.append(kwargs["priority"])
        return engine_generate(*args, **kwargs)

    replica.engine.generate = generate_spy

    async def collect() -> list:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        return [output async for output in replica.generate("r1", list(range(100, 110)), params, priority=-3)]

    assert asyncio.run(collect())[-1].finished
    assert seen == [-3]


def test_a_refused_request_raises_the_contracts_torch_free_error(replica) -> None:
    async def collect() -> list:
        params = SamplingParams(max_tokens=2000, temperature=0.0)  # over max_model_len (1024)
        return [output async for output in replica.generate("r1", list(range(100, 110)), params)]

    with pytest.raises(RequestRejectedError, match="max_model_len"):
        asyncio.run(collect())


def test_health_check_passes_while_the_loop_runs(replica) -> None:
    replica.check_health()


def test_health_check_fails_when_the_loop_stalls(replica) -> None:
    release = threading.Event()
    replica.engine._drain_commands = lambda block: release.wait(10)  # the loop's next turn hangs, as a stuck step would
    replica.stall_timeout_s = 0.2

    def unhealthy() -> str | None:
        try:
            replica.check_health()
        except EngineUnhealthyError as error:
            return str(error)
        return None

    try:
        assert "no progress" in wait_until(unhealthy, timeout_s=5, interval_s=0.05)
    finally:
        release.set()


def test_health_check_fails_when_the_loop_died(replica) -> None:
    replica.engine.shutdown()
    with pytest.raises(EngineUnhealthyError, match="not running"):
        replica.check_health()


def test_a_replica_fetches_the_prefix_blocks_it_lacks_from_the_holder(tiny_llama_dir: Path) -> None:
    """The request router's `kv_source`: the receiving replica imports the holder's blocks before the request
    queues, hits them, and generates what the holder itself does; an unreachable source costs only the prefix."""
    config = {"model": str(tiny_llama_dir), "kv_cache_memory_bytes": 4 * 2**20, "num_threads": 1, "block_size": 8}
    holder, receiver, cut_off = (LLMReplica.func_or_class(config) for _ in range(3))
    try:
        prompt = list(range(1000, 1061))  # 7 full blocks of 8
        generate(holder, prompt, max_tokens=3)
        report = RoutingStats.from_dict(holder.record_routing_stats())
        assert report.kv_transfer_address == holder.kv_server.address
        assert report.kv_transfer_address.startswith("127.0.0.1:")

        follow_up = prompt + list(range(2000, 2011))
        source = {"address": holder.kv_server.address, "num_blocks": 7}
        fetched = generate(receiver, follow_up, max_tokens=6, request_id="f", kv_source=source)
        stats = receiver.engine.stats()
        assert stats.num_imported_tokens == 56 and stats.prefix_cache_hits == 56
        assert RoutingStats.from_dict(receiver.record_routing_stats()).num_imported_tokens == 56
        expected = generate(holder, follow_up, max_tokens=6, request_id="h")  # the holder's own hit
        assert tokens_of(fetched) == tokens_of(expected)

        unreachable = {"address": free_port_address(), "num_blocks": 7}  # nothing listens there
        computed = generate(cut_off, follow_up, max_tokens=6, request_id="c", kv_source=unreachable)
        assert tokens_of(computed) == tokens_of(expected)
        assert cut_off.engine.stats().num_imported_tokens == 0 and cut_off.engine.stats().prefix_cache_hits == 0
    finally:
        for instance in (holder, receiver, cut_off):
            instance.shutdown()


def tokens_of(outputs: list) -> list[int]:
    return [token for output in outputs for token in output.outputs[0].token_ids]
