"""The engine (scheduler + block manager + model) under hypothesis-generated workloads: add, step, abort, fork (n > 1),
preempt (a KV budget of a few blocks) and prefix-cache hits (prompts sharing prefixes).

After every operation the block accounting is consistent; every request finishes exactly once (or is aborted and
never heard of again); at the end every block is free and the greedy tokens of each request that was not aborted
equal those of the same request run alone. The default run does about 1,000 operations; `pytest -m slow` over
10,000 (and the block manager's own machine, from test_block_manager.py, for longer).
"""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from replicas import LLMEngine, SamplingParams
from replicas.block_manager import BlockManager
from replicas.input_batch import InputBatch
from replicas.scheduler import Scheduler
from replicas.sequence import SequenceStatus
from tests.engine.helpers import make_engine, random_prompts
from tests.engine.test_block_manager import BlockManagerMachine

BLOCK_SIZE = 4
TINY_BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * BLOCK_SIZE  # layers x kv heads x head_dim x fp32 x block_size, K and V
NUM_BLOCKS = 16  # a few requests fill it (one max_model_len sequence takes all): preemption is common
MAX_MODEL_LEN = 64
MAX_NUM_SEQS = 4
MAX_NUM_BATCHED_TOKENS = 24  # prompts and recomputations after preemption are prefilled in chunks
SHARED_PREFIXES = random_prompts(3, 8, 12, seed=77)  # whole blocks of these are prefix-cache hits
SUFFIXES = random_prompts(16, 1, 10, seed=78)

# Operations run in this process, across examples (the issue asks for >= 10,000), and samples forked.
OPERATIONS = {"count": 0, "forks": 0, "preemptions": 0, "prefix_hit_tokens": 0}


class _Engines:
    """One engine under test and one for solo reference runs, built once per module (model loading is the slow
    part) and drained between examples."""

    def __init__(self, model_dir: Path) -> None:
        self.engine = make_engine(
            model_dir, block_size=BLOCK_SIZE, kv_cache_memory_bytes=NUM_BLOCKS * TINY_BLOCK_BYTES,
            max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
            num_threads=1,
        )  # fmt: skip
        self.solo_engine = make_engine(model_dir, block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, num_threads=1)
        self._solo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def solo(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The request's greedy tokens with the engine to itself."""
        key = (tuple(prompt), max_tokens)
        if key not in self._solo:
            engine = self.solo_engine
            engine.add_request("solo", prompt, _greedy(max_tokens))
            while engine.has_unfinished():
                for output in engine.step():
                    if output.finished:
                        self._solo[key] = output.outputs[0].token_ids
        return self._solo[key]


_ENGINES: _Engines | None = None


def _greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, n=n)


@pytest.fixture(scope="module", autouse=True)
def engines(tiny_llama_dir: Path) -> _Engines:
    global _ENGINES
    _ENGINES = _Engines(tiny_llama_dir)
    yield _ENGINES
    _ENGINES = None


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert _ENGINES is not None
        self.engines = _ENGINES
        self.engine: LLMEngine = _ENGINES.engine
        assert not self.engine.has_unfinished()
        # NOTE: fresh bookkeeping (an empty prefix cache) for each example: hypothesis replays examples and needs
        # each one to behave the same every time. The model and its KV tensors are reused.
        self.engine.block_manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True)
        self.engine.scheduler = Scheduler(self.engine.block_manager, MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS,
                                          eos_token_ids=self.engine.eos_token_ids, max_model_len=MAX_MODEL_LEN)
        self.engine.model_runner.input_batch = InputBatch(MAX_NUM_SEQS, MAX_MODEL_LEN, BLOCK_SIZE)
        self.submitted: dict[str, tuple[list[int], int, int]] = {}  # id -> prompt, max_tokens, n
        self.finished: dict[str, list[list[int]]] = {}
        self.aborted: set[str] = set()
        self.next_id = 0

    def _record(self, outputs: list) -> None:
        for output in outputs:
            request_id = output.request_id
            assert request_id not in self.finished, f"{request_id} reported after it finished"
            assert request_id not in self.aborted, f"{request_id} reported after it was aborted"
            assert output.error is None, output.error
            if output.finished:
                self.finished[request_id] = [completion.token_ids for completion in output.outputs]
                OPERATIONS["forks"] += len(output.outputs) - 1

    @rule(prefix=st.sampled_from([None, *range(len(SHARED_PREFIXES))]), suffix=st.sampled_from(range(len(SUFFIXES))),
          max_tokens=st.integers(1, 12), n=st.sampled_from([1, 1, 1, 2]))  # fmt: skip
    def add(self, prefix: int | None, suffix: int, max_tokens: int, n: int) -> None:
        prompt = (SHARED_PREFIXES[prefix] if prefix is not None else []) + SUFFIXES[suffix]
        request_id = f"r{self.next_id}"
        self.next_id += 1
        self.engine.add_request(request_id, prompt, _greedy(max_tokens, n))
        self.submitted[request_id] = (prompt, max_tokens, n)
        OPERATIONS["count"] += 1

    @precondition(lambda self: self.engine.has_unfinished())
    @rule(times=st.integers(1, 4))
    def step(self, times: int) -> None:
        for _ in range(times):
            self._record(self.engine.step())
        OPERATIONS["count"] += 1

    @precondition(lambda self: self.engine.has_unfinished())
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.engine.requests)))
        assert self.engine.abort(request_id)
        self.aborted.add(request_id)
        assert not self.engine.abort(request_id)  # a second abort is a no-op
        OPERATIONS["count"] += 1

    @invariant()
    def block_accounting_is_consistent(self) -> None:
        manager = self.engine.block_manager
        live = [seq for state in self.engine.requests.values() for seq in state.seqs if not seq.is_finished]
        counts = [0] * manager.num_total_blocks
        for seq in live:
            for block_id in seq.block_table:
                counts[block_id] += 1
        made = len(manager.blocks)  # blocks are made on first use
        assert [block.ref_count for block in manager.blocks] == counts[:made] and not any(counts[made:])
        used = {block_id for seq in live for block_id in seq.block_table}
        assert not used & set(manager.free_block_ids)
        assert len(used) + manager.num_free_blocks == manager.num_total_blocks
        hashed_free = sum(1 for block_id in manager.free_block_ids if manager.blocks[block_id].block_hash is not None)
        assert manager.num_cached_free_blocks == hashed_free
        for block_hash, block_id in manager.prefix_cache.cached_block_ids.items():
            assert manager.blocks[block_id].block_hash == block_hash

    @invariant()
    def queues_hold_exactly_the_live_sequences(self) -> None:
        scheduler = self.engine.scheduler
        assert all(seq.status is SequenceStatus.RUNNING for seq in scheduler.running)
        assert all(seq.status is SequenceStatus.WAITING and not seq.block_table for seq in scheduler.waiting)
        assert len(scheduler.running) <= MAX_NUM_SEQS
        queued = {id(seq) for seq in scheduler.running} | {id(seq) for seq in scheduler.waiting}
        live = {id(seq) for state in self.engine.requests.values() for seq in state.seqs if not seq.is_finished}
        assert queued == live
        for seq in scheduler.running:
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_computed_tokens

    def teardown(self) -> None:
        for _ in range(10_000):
            if not self.engine.has_unfinished():
                break
            self._record(self.engine.step())
        assert not self.engine.has_unfinished()
        manager = self.engine.block_manager
        assert manager.num_free_blocks == manager.num_total_blocks
        OPERATIONS["preemptions"] += self.engine.scheduler.num_preemptions
        OPERATIONS["prefix_hit_tokens"] += manager.num_prefix_hit_tokens
        # Every request not aborted finished exactly once (`_record` refuses a second report), with solo tokens.
        assert set(self.finished) == set(self.submitted) - self.aborted
        for request_id, samples in self.finished.items():
            prompt, max_tokens, n = self.submitted[request_id]
            solo = self.engines.solo(prompt, max_tokens)
            assert samples == [solo] * n, (request_id, prompt, max_tokens)


def _settings(max_examples: int, steps: int) -> settings:
    return settings(max_examples=max_examples, stateful_step_count=steps, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip


def _assert_workload_coverage() -> None:
    """The generated workloads really preempted, hit the prefix cache and forked (or the properties say little)."""
    assert OPERATIONS["preemptions"] > 0 and OPERATIONS["prefix_hit_tokens"] > 0 and OPERATIONS["forks"] > 0, OPERATIONS


class TestEngineProperties(EngineMachine.TestCase):
    settings = _settings(max_examples=25, steps=40)

    def runTest(self) -> None:  # noqa: N802 — unittest's name
        super().runTest()
        _assert_workload_coverage()


@pytest.mark.slow
class TestEnginePropertiesLong(EngineMachine.TestCase):
    settings = _settings(max_examples=260, steps=50)

    def runTest(self) -> None:  # noqa: N802 — unittest's name
        super().runTest()
        _assert_workload_coverage()
        print(f"\nengine machine: {OPERATIONS}")
        assert OPERATIONS["count"] >= 10_000


@pytest.mark.slow
class TestBlockManagerPropertiesLong(BlockManagerMachine.TestCase):
    """test_block_manager.py's machine, longer: 300 x 50 = 15,000 operations."""

    settings = _settings(max_examples=300, steps=50)
