"""Block manager invariants under random allocate / append / fork / free / prefix-hit sequences."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from replicas import SamplingParams
from replicas.block_manager import BlockManager
from replicas.sequence import Sequence

BLOCK_SIZE = 4
NUM_BLOCKS = 24


def make_seq(seq_id: int, token_ids: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(token_ids), len(token_ids), SamplingParams())


class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences grow by chunks as the scheduler would drive them; the invariants hold after every operation."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True)
        self.live: list[Sequence] = []
        self.next_id = 0
        # Content model: what each physical slot holds (token id and position), written as the engine would.
        self.slots: dict[int, tuple[int, int]] = {}

    def _compute(self, seq: Sequence, num_new: int) -> None:
        """Simulate the model runner: perform pending copies, write the new tokens' slots, then register blocks."""
        for src, dst in self.manager.take_pending_copies():
            for offset in range(BLOCK_SIZE):
                if (src * BLOCK_SIZE + offset) in self.slots:
                    self.slots[dst * BLOCK_SIZE + offset] = self.slots[src * BLOCK_SIZE + offset]
        for position in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new):
            block_id = seq.block_table[position // BLOCK_SIZE]
            # A block another live sequence still references must never be written (copy-on-write).
            writers = [s for s in self.live if s is not seq and block_id in s.block_table]
            assert not writers, f"block {block_id} written while shared with {[s.seq_id for s in writers]}"
            self.slots[block_id * BLOCK_SIZE + position % BLOCK_SIZE] = (seq.token_ids[position], position)
        self.manager.advance(seq, num_new)
        self.manager.cache_full_blocks(seq)

    @rule(length=st.integers(1, 20), shared_prefix=st.booleans(), data=st.data())
    def add(self, length: int, shared_prefix: bool, data: st.DataObject) -> None:
        if shared_prefix and self.live:
            donor = data.draw(st.sampled_from(self.live))
            tokens = donor.token_ids[: data.draw(st.integers(1, donor.num_tokens))] + [7] * length
        else:
            tokens = data.draw(st.lists(st.integers(0, 3), min_size=length, max_size=length))
        seq = make_seq(self.next_id, tokens)
        self.next_id += 1
        prefix = self.manager.lookup_prefix(seq)
        num_new = seq.num_tokens - len(prefix) * BLOCK_SIZE
        if self.manager.allocate_slots(seq, num_new, prefix):
            # Every reused block holds exactly this sequence's tokens at the same positions.
            for index, block_id in enumerate(prefix):
                for offset in range(BLOCK_SIZE):
                    position = index * BLOCK_SIZE + offset
                    assert self.slots[block_id * BLOCK_SIZE + offset] == (seq.token_ids[position], position)
            self.live.append(seq)
            self._compute(seq, num_new)
        else:
            assert seq.block_table == [] and seq.num_computed_tokens == 0

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 3))
    def append(self, data: st.DataObject, token: int) -> None:
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.append(token)
        if self.manager.allocate_slots(seq, 1):
            self._compute(seq, 1)
        else:
            seq.token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self.live))
        child = parent.fork(self.next_id, 1, None)
        self.next_id += 1
        self.manager.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.manager.free(seq)

    @invariant()
    def reference_counts_match_block_tables(self) -> None:
        counts = [0] * NUM_BLOCKS
        for seq in self.live:
            for block_id in seq.block_table:
                counts[block_id] += 1
        made = len(self.manager.blocks)  # blocks are made on first use; the rest have never been referenced
        assert [block.ref_count for block in self.manager.blocks] == counts[:made]
        assert not any(counts[made:])

    @invariant()
    def free_plus_used_is_total(self) -> None:
        manager = self.manager
        used = {block_id for seq in self.live for block_id in seq.block_table}
        free = set(manager.free_block_ids) | set(range(len(manager.blocks), NUM_BLOCKS))
        assert not used & free
        assert len(used) + len(free) == NUM_BLOCKS == len(used) + manager.num_free_blocks
        hashed_free = sum(1 for block_id in manager.free_block_ids if manager.blocks[block_id].block_hash is not None)
        assert manager.num_cached_free_blocks == hashed_free

    @invariant()
    def live_slots_count_each_shared_block_once(self) -> None:
        filled: dict[int, int] = {}
        for seq in self.live:
            for block_index, block_id in enumerate(seq.block_table):
                fill = min(BLOCK_SIZE, seq.num_computed_tokens - block_index * BLOCK_SIZE)
                filled[block_id] = max(filled.get(block_id, 0), fill)
        assert self.manager.num_live_slots == sum(filled.values())

    @invariant()
    def tables_cover_computed_tokens(self) -> None:
        for seq in self.live:
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_computed_tokens

    @invariant()
    def cache_index_points_at_registered_blocks(self) -> None:
        for block_hash, block_id in self.manager.prefix_cache.cached_block_ids.items():
            assert self.manager.blocks[block_id].block_hash == block_hash


TestBlockManagerProperties = BlockManagerMachine.TestCase
TestBlockManagerProperties.settings = settings(
    max_examples=150, stateful_step_count=40, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_blocks_are_allocated_on_demand_as_a_sequence_grows() -> None:
    manager = BlockManager(8, BLOCK_SIZE)
    seq = make_seq(0, [1, 2, 3])
    assert manager.allocate_slots(seq, 3)
    assert len(seq.block_table) == 1
    seq.num_computed_tokens = 3
    seq.token_ids.append(4)
    assert manager.allocate_slots(seq, 1) and len(seq.block_table) == 1
    seq.num_computed_tokens = 4
    seq.token_ids.append(5)
    assert manager.allocate_slots(seq, 1) and len(seq.block_table) == 2
    assert manager.num_free_blocks == 6


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    manager = BlockManager(2, BLOCK_SIZE)
    seq = make_seq(0, list(range(9)))
    assert not manager.allocate_slots(seq, 9)
    assert seq.block_table == [] and manager.num_free_blocks == 2


def test_lru_evicts_the_least_recently_freed_cached_block_first() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    first, second = make_seq(0, [1] * 5), make_seq(1, [2] * 5)
    for seq in (first, second):
        assert manager.allocate_slots(seq, 5)
        seq.num_computed_tokens = 5
        manager.cache_full_blocks(seq)
    first_full, second_full = first.block_table[0], second.block_table[0]
    manager.free(first)
    manager.free(second)
    assert manager.num_cached_free_blocks == 2
    # A fresh 1-block sequence takes a free block: the uncached ones go first, then the oldest cached one.
    takers = [make_seq(10 + i, [9]) for i in range(3)]
    for taker in takers:
        assert manager.allocate_slots(taker, 1)
    assert first_full in {t.block_table[0] for t in takers}
    assert second_full not in {t.block_table[0] for t in takers}
    assert manager.lookup_prefix(make_seq(20, [1] * 5)) == []
    assert manager.lookup_prefix(make_seq(21, [2] * 5)) == [second_full]


def _computed(manager: BlockManager, seq: Sequence) -> Sequence:
    assert manager.allocate_slots(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_full_blocks(seq)
    return seq


def test_forced_hash_collisions_never_alias_different_tokens(monkeypatch) -> None:
    import replicas.contract as contract

    # Every block hashes alike: the prefix cache and the router's affinity share this one hash function.
    monkeypatch.setattr(contract, "hash_block_tokens", lambda parent, tokens: b"same")
    manager = BlockManager(8, BLOCK_SIZE)
    a = _computed(manager, make_seq(0, [1, 1, 1, 1, 5]))
    assert manager.lookup_prefix(make_seq(1, [2, 2, 2, 2, 5])) == []
    assert manager.lookup_prefix(make_seq(2, [1, 1, 1, 1, 6])) == [a.block_table[0]]


def test_a_block_matched_under_another_parent_is_not_reused(monkeypatch) -> None:
    """A hash that ignores the parent makes [3333] after [1111] collide with [3333] after [2222]: its K/V was
    computed after [1111], so the parent link must refuse it."""
    import replicas.contract as contract

    monkeypatch.setattr(contract, "hash_block_tokens", lambda parent, tokens: bytes(tokens))
    manager = BlockManager(8, BLOCK_SIZE)
    a = _computed(manager, make_seq(0, [1, 1, 1, 1, 3, 3, 3, 3, 0]))
    d = _computed(manager, make_seq(1, [2, 2, 2, 2, 3, 3, 3, 3, 0]))
    assert manager.lookup_prefix(make_seq(2, [2, 2, 2, 2, 3, 3, 3, 3, 9])) == [d.block_table[0]]
    assert manager.lookup_prefix(make_seq(3, [1, 1, 1, 1, 3, 3, 3, 3, 9])) == a.block_table[:2]
