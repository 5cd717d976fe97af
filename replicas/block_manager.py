"""Paged KV cache bookkeeping: fixed-size blocks, block tables, reference counts, prefix cache, copy-on-write.

The block manager owns no tensors. It decides which physical block holds which tokens of which sequence and
writes `seq.block_table`; the model runner turns that into slot mappings and block tables for the kernels.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from replicas.contract import hash_block_tokens
from replicas.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    # Set while the block holds a registered full block of tokens (reusable by the prefix cache).
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None
    # The registered block this one followed when its K/V was computed, and that block's generation then.
    parent: tuple[int, int] | None = None
    # Bumped whenever the block's content is thrown away, so stale parent links stop matching.
    generation: int = 0


class BlockManager:
    """Allocates KV blocks to sequences on demand.

    Free blocks sit in an LRU queue. With prefix caching, a freed full block keeps its hash and content and can be
    claimed again by a later sequence with the same prefix until a fresh block is needed and it is evicted.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        reserve_tokens_per_seq: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Traditional allocation: reserve this many slots per sequence at admission (benchmarks only).
        self.reserve_tokens_per_seq = reserve_tokens_per_seq
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((block_id, None) for block_id in range(num_blocks))
        self.cached_block_ids: dict[bytes, int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (cached ones included: they are evicted on demand)."""
        return len(self.free_block_ids)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for block_id in self.free_block_ids if self.blocks[block_id].block_hash is not None)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache ----------------------------------------------------------------------------------------

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Registered blocks holding the longest cached run of `seq`'s leading full blocks.

        At least one token is always left to compute, since the step that computes it produces the next token's
        logits.
        """
        if not self.enable_prefix_caching:
            return []
        matched: list[int] = []
        parent_hash: bytes | None = None
        for block_index in range((seq.num_tokens - 1) // self.block_size):
            start = block_index * self.block_size
            token_ids = tuple(seq.token_ids[start : start + self.block_size])
            block_hash = hash_block_tokens(parent_hash, token_ids)
            block_id = self.cached_block_ids.get(block_hash)
            if block_id is None:
                break
            block = self.blocks[block_id]
            # NOTE: the hash only finds a candidate; tokens and the parent link decide, so a collision can cost a
            # cache miss but never serve another prefix's K/V.
            expected_parent = None if not matched else (matched[-1], self.blocks[matched[-1]].generation)
            if block.token_ids != token_ids or block.parent != expected_parent:
                break
            matched.append(block_id)
            parent_hash = block_hash
        return matched

    def full_block_hashes(self, seq: Sequence) -> list[bytes]:
        """Chained hashes of `seq`'s full blocks, as they will be registered once computed (last token excluded)."""
        hashes: list[bytes] = []
        parent_hash: bytes | None = None
        for block_index in range((seq.num_tokens - 1) // self.block_size):
            start = block_index * self.block_size
            parent_hash = hash_block_tokens(parent_hash, tuple(seq.token_ids[start : start + self.block_size]))
            hashes.append(parent_hash)
        return hashes

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that became full and computed, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for block_index in range(len(seq.block_hashes), num_full):
            start = block_index * self.block_size
            token_ids = tuple(seq.token_ids[start : start + self.block_size])
            parent_hash = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = hash_block_tokens(parent_hash, token_ids)
            seq.block_hashes.append(block_hash)
            block = self.blocks[seq.block_table[block_index]]
            if block.block_hash is not None or block_hash in self.cached_block_ids:
                continue  # already registered (a prefix hit or a fork), or an identical block is
            parent_id = self.cached_block_ids.get(parent_hash) if parent_hash is not None else None
            if parent_hash is not None and parent_id is None:
                continue  # the parent was evicted: this block could never be matched
            block.block_hash, block.token_ids = block_hash, token_ids
            block.parent = None if parent_id is None else (parent_id, self.blocks[parent_id].generation)
            self.cached_block_ids[block_hash] = block.block_id

    # --- allocation -------------------------------------------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, prefix_block_ids: list[int] | None = None) -> bool:
        """Make `seq.block_table` cover its computed tokens plus `num_new_tokens`.

        On admission, `prefix_block_ids` are cached blocks that already hold its first tokens. Returns False and
        changes nothing when there are not enough free blocks. A shared block about to be written is copied first
        (the copy is queued in `pending_copies` for the model runner).
        """
        prefix_block_ids = prefix_block_ids or []
        num_computed = seq.num_computed_tokens + len(prefix_block_ids) * self.block_size
        num_blocks_after = self.blocks_needed(num_computed + num_new_tokens)
        if self.reserve_tokens_per_seq is not None and not seq.block_table:
            num_blocks_after = max(num_blocks_after, self.blocks_needed(self.reserve_tokens_per_seq))
        num_new_blocks = max(0, num_blocks_after - len(seq.block_table) - len(prefix_block_ids))
        num_revived = sum(1 for block_id in prefix_block_ids if self.blocks[block_id].ref_count == 0)
        needs_copy = (
            num_computed % self.block_size != 0
            and num_computed // self.block_size < len(seq.block_table)
            and self.blocks[seq.block_table[num_computed // self.block_size]].ref_count > 1
        )
        if num_new_blocks + num_revived + int(needs_copy) > self.num_free_blocks:
            return False

        for block_id in prefix_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        if seq.num_computed_tokens == 0 and self.enable_prefix_caching:  # an admission: count the lookup
            self.num_prefix_query_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += len(prefix_block_ids) * self.block_size
        if prefix_block_ids:
            seq.num_computed_tokens = num_computed
            seq.block_hashes = [self.blocks[block_id].block_hash for block_id in prefix_block_ids]  # type: ignore[misc]
        if needs_copy:
            write_index = num_computed // self.block_size
            shared = self.blocks[seq.block_table[write_index]]
            copy = self._take_free_block()
            shared.ref_count -= 1
            seq.block_table[write_index] = copy.block_id
            self.pending_copies.append((shared.block_id, copy.block_id))
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_free_block().block_id)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks; the first write to a shared partial block copies it."""
        child.block_table = list(parent.block_table)
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks. Tail blocks go first into the LRU queue, so they are evicted before the prefix."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than it was taken"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _take_free_block(self) -> KVBlock:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its content is about to be overwritten
            if self.cached_block_ids.get(block.block_hash) == block_id:
                del self.cached_block_ids[block.block_hash]
            block.block_hash, block.token_ids, block.parent = None, None, None
            block.generation += 1
        block.ref_count = 1
        return block

    # --- accounting -------------------------------------------------------------------------------------------

    def live_slots(self, seqs: list[Sequence]) -> int:
        """Slots holding computed tokens of `seqs`, counting a shared block once."""
        filled: dict[int, int] = {}
        for seq in seqs:
            for block_index, block_id in enumerate(seq.block_table):
                fill = min(self.block_size, seq.num_computed_tokens - block_index * self.block_size)
                if fill > filled.get(block_id, 0):
                    filled[block_id] = fill
        return sum(filled.values())
