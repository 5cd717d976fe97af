"""Paged KV cache bookkeeping: fixed-size blocks, block tables, reference counts, copy-on-write, and when blocks
enter and leave the prefix cache (the index itself is `replicas/prefix_cache.py`).

The block manager owns no tensors. It decides which physical block holds which tokens of which sequence and
writes `seq.block_table`; the model runner turns that into slot mappings and block tables for the kernels. Its
counters (free, cached, live slots) are kept up to date as blocks change hands, so reading them costs nothing,
and block records are made the first time a block is used, so a cache of millions of blocks starts instantly.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from replicas.contract import extend_block_hashes
from replicas.prefix_cache import PrefixCache
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
    num_filled_slots: int = 0  # slots holding computed K/V (the most any holder computed)


class BlockManager:
    """Allocates KV blocks to sequences on demand.

    Free blocks that were used sit in an LRU queue; blocks never used yet come first, from a counter. With prefix
    caching, a freed full block keeps its hash and content and can be claimed again by a later sequence with the
    same prefix until a fresh block is needed and it is evicted.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        reserve_tokens_per_seq: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.num_total_blocks = num_blocks
        # Traditional allocation: reserve this many slots per sequence at admission (benchmarks only).
        self.reserve_tokens_per_seq = reserve_tokens_per_seq
        self.blocks: list[KVBlock] = []  # block i is made when first used; ids >= len(blocks) are fresh
        self.free_block_ids: OrderedDict[int, None] = OrderedDict()  # used, now unreferenced; LRU first
        self.prefix_cache = PrefixCache(self.blocks, block_size, enable_prefix_caching)
        self.pending_copies: list[tuple[int, int]] = []
        self.num_cached_free_blocks = 0  # free blocks that still hold a registered prefix
        self.num_live_slots = 0  # filled slots of referenced blocks, a shared block counted once
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.num_imported_blocks = 0  # blocks whose K/V came from another engine (`import_blocks`)

    @property
    def enable_prefix_caching(self) -> bool:
        return self.prefix_cache.enabled

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (cached ones included: they are evicted on demand)."""
        return len(self.free_block_ids) + self.num_total_blocks - len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache: lookups, registration, blocks imported from another engine ------------------------------

    def block_hashes(self, seq: Sequence) -> list[bytes]:
        """`seq.block_hashes` brought up to its full blocks, last token excluded (each block is hashed once)."""
        extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, (seq.num_tokens - 1) // self.block_size)
        return seq.block_hashes

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Registered blocks holding the longest cached run of `seq`'s leading full blocks.

        At least one token is always left to compute, since the step that computes it produces the next token's
        logits.
        """
        if not self.enable_prefix_caching:
            return []
        return self.prefix_cache.match(self.block_hashes(seq), seq.token_ids)

    def import_blocks(self, token_ids: list[int], start_block: int, num_blocks: int) -> list[int]:
        """Register fresh blocks for `token_ids`' full blocks `start_block` .. `start_block + num_blocks - 1`,
        whose K/V another engine computed; returns their ids, in order, for the caller to write the K/V into before
        any step runs. Fewer (maybe none) when this cache no longer holds blocks `0 .. start_block - 1` (the new
        ones chain onto them), already holds some of the new ones, or has no free block left. They are left free
        and cached, most recently used, as a finished sequence leaves its prefix."""
        if not self.enable_prefix_caching or num_blocks <= 0:
            return []
        hashes: list[bytes] = []
        extend_block_hashes(hashes, token_ids, self.block_size, start_block + num_blocks)
        cache = self.prefix_cache
        matched = cache.match(hashes, token_ids)
        if len(matched) < start_block:
            return []
        held = matched[:start_block]
        for block_id in held:  # taken while new blocks are: eviction must not take the run they chain onto
            self._claim(block_id)
        new_ids: list[int] = []
        for block_index in range(start_block, start_block + num_blocks):
            if self.num_free_blocks == 0 or hashes[block_index] in cache.cached_block_ids:
                break  # no room, or cached here already (or a colliding hash): nothing further can chain on
            block = self._take_free_block()
            parent_id = (held + new_ids)[-1] if block_index else None
            cache.register(block, hashes[block_index], token_ids, block_index, parent_id)
            block.num_filled_slots = self.block_size
            self.num_live_slots += self.block_size
            new_ids.append(block.block_id)
        self._release(held + new_ids)
        self.num_imported_blocks += len(new_ids)
        return new_ids

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that became full and computed, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, num_full)
        cache = self.prefix_cache
        for block_index in range(seq.num_registered_blocks, num_full):
            block_hash = seq.block_hashes[block_index]
            block = self.blocks[seq.block_table[block_index]]
            if block.block_hash is not None or block_hash in cache.cached_block_ids:
                continue  # already registered (a prefix hit or a fork), or an identical block is
            parent_hash = seq.block_hashes[block_index - 1] if block_index else None
            parent_id = cache.cached_block_ids.get(parent_hash) if parent_hash is not None else None
            if parent_hash is not None and parent_id is None:
                continue  # the parent was evicted: this block could never be matched
            cache.register(block, block_hash, seq.token_ids, block_index, parent_id)
        seq.num_registered_blocks = num_full

    # --- allocation -------------------------------------------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, prefix_block_ids: list[int] | None = None) -> bool:
        """Make `seq.block_table` cover its computed tokens plus `num_new_tokens`.

        On admission, `prefix_block_ids` are cached blocks that already hold its first tokens. Returns False and
        changes nothing when there are not enough free blocks. A shared block about to be written is copied first
        (the copy is queued in `pending_copies` for the model runner).
        """
        block_size = self.block_size
        if not prefix_block_ids and seq.block_table:
            # NOTE: the common case (a decode or a prompt chunk within its blocks, none shared at the write
            # position) needs no new block, no copy, no accounting: answered without the general path.
            num_computed = seq.num_computed_tokens
            write_index = num_computed // block_size
            if num_computed + num_new_tokens <= len(seq.block_table) * block_size and (
                num_computed % block_size == 0 or self.blocks[seq.block_table[write_index]].ref_count == 1
            ):
                return True
        prefix_block_ids = prefix_block_ids or []
        num_computed = seq.num_computed_tokens + len(prefix_block_ids) * block_size
        num_blocks_after = self.blocks_needed(num_computed + num_new_tokens)
        if self.reserve_tokens_per_seq is not None and not seq.block_table:
            num_blocks_after = max(num_blocks_after, self.blocks_needed(self.reserve_tokens_per_seq))
        num_new_blocks = max(0, num_blocks_after - len(seq.block_table) - len(prefix_block_ids))
        num_revived = sum(1 for block_id in prefix_block_ids if self.blocks[block_id].ref_count == 0)
        write_index = num_computed // block_size
        needs_copy = (
            num_computed % block_size != 0
            and write_index < len(seq.block_table)
            and self.blocks[seq.block_table[write_index]].ref_count > 1
        )
        if num_new_blocks + num_revived + int(needs_copy) > self.num_free_blocks:
            return False

        for block_id in prefix_block_ids:
            self._claim(block_id)
            seq.block_table.append(block_id)
        if seq.num_computed_tokens == 0 and self.enable_prefix_caching:  # an admission: count the lookup
            self.num_prefix_query_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += len(prefix_block_ids) * block_size
        if prefix_block_ids:
            seq.num_computed_tokens = num_computed
            seq.num_registered_blocks = len(prefix_block_ids)
        if needs_copy:
            shared = self.blocks[seq.block_table[write_index]]
            copy = self._take_free_block()
            shared.ref_count -= 1
            copy.num_filled_slots = num_computed % block_size
            self.num_live_slots += copy.num_filled_slots
            seq.block_table[write_index] = copy.block_id
            self.pending_copies.append((shared.block_id, copy.block_id))
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_free_block().block_id)
        return True

    def advance(self, seq: Sequence, num_new_tokens: int) -> None:
        """Account for `num_new_tokens` more computed tokens of `seq` (their K/V was written this step)."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens
        seq.num_computed_tokens = end
        block_size = self.block_size
        for block_index in range(start // block_size, self.blocks_needed(end)):
            block = self.blocks[seq.block_table[block_index]]
            filled = min(block_size, end - block_index * block_size)
            if filled > block.num_filled_slots:
                self.num_live_slots += filled - block.num_filled_slots
                block.num_filled_slots = filled

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks; the first write to a shared partial block copies it."""
        child.block_table = list(parent.block_table)
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks."""
        self._release(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _claim(self, block_id: int) -> None:
        """One more holder of a registered block; a free one (cached) leaves the LRU queue."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
            self.num_cached_free_blocks -= 1
            self.num_live_slots += block.num_filled_slots
        block.ref_count += 1

    def _release(self, block_ids: list[int]) -> None:
        """One holder fewer of each block. Tail blocks go first into the LRU queue, so they are evicted before the
        prefix they follow."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than it was taken"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                self.num_live_slots -= block.num_filled_slots
                if block.block_hash is not None:
                    self.num_cached_free_blocks += 1

    def _take_free_block(self) -> KVBlock:
        if len(self.blocks) < self.num_total_blocks:  # never used: no cached content to evict
            block = KVBlock(len(self.blocks))
            self.blocks.append(block)
        else:
            block_id, _ = self.free_block_ids.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict: its content is about to be overwritten
                self.num_cached_free_blocks -= 1
                self.prefix_cache.forget(block)
            block.generation += 1
        block.ref_count = 1
        block.num_filled_slots = 0
        return block
