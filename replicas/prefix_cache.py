"""The prefix cache: which KV blocks hold which full blocks of tokens, found by chained content hashes.

A block is registered once it is full and computed, under the hash of its tokens chained onto the hash of the blocks
before it (`replicas.contract.extend_block_hashes`). The block manager decides when blocks are registered and
evicted; this index answers "which cached blocks hold this run of tokens", for the scheduler, for routing reports,
and for moving a prefix between engines (`replicas/kv_transfer.py`). It only reads the block records the block
manager owns, so every lookup is safe from another thread (it gives a snapshot; `still_held` checks it later).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from replicas.contract import extend_block_hashes

if TYPE_CHECKING:
    from replicas.block_manager import KVBlock


class PrefixCache:
    def __init__(self, blocks: list[KVBlock], block_size: int, enabled: bool = True) -> None:
        self.blocks = blocks  # the block manager's records, shared
        self.block_size = block_size
        self.enabled = enabled
        self.cached_block_ids: dict[bytes, int] = {}  # registration order: most recent last

    def match(self, block_hashes: list[bytes], token_ids: list[int]) -> list[int]:
        """Registered blocks holding the leading run of these blocks (chained `block_hashes` of `token_ids`)."""
        matched: list[int] = []
        for block_index, block_hash in enumerate(block_hashes):
            block_id = self.cached_block_ids.get(block_hash)
            if block_id is None:
                break
            block = self.blocks[block_id]
            start = block_index * self.block_size
            # NOTE: the hash only finds a candidate; tokens and the parent link decide, so a collision can cost a
            # cache miss but never serve another prefix's K/V.
            expected_parent = None if not matched else (matched[-1], self.blocks[matched[-1]].generation)
            if block.parent != expected_parent or block.token_ids != tuple(token_ids[start : start + self.block_size]):
                break
            matched.append(block_id)
        return matched

    def register(self, block: KVBlock, block_hash: bytes, token_ids: list[int], block_index: int,
                 parent_id: int | None) -> None:  # fmt: skip
        """Make `block` (holding `token_ids`' block `block_index`, after block `parent_id`) findable."""
        start = block_index * self.block_size
        block.block_hash, block.token_ids = block_hash, tuple(token_ids[start : start + self.block_size])
        block.parent = None if parent_id is None else (parent_id, self.blocks[parent_id].generation)
        self.cached_block_ids[block_hash] = block.block_id

    def forget(self, block: KVBlock) -> None:
        """`block`'s content is about to be overwritten: it no longer holds what it was registered with."""
        if self.cached_block_ids.get(block.block_hash) == block.block_id:
            del self.cached_block_ids[block.block_hash]
        block.block_hash, block.token_ids, block.parent = None, None, None

    def cached_run(self, token_ids: list[int], max_blocks: int) -> list[tuple[int, int]]:
        """(block id, generation) of the registered blocks holding `token_ids`' leading full blocks (at most
        `max_blocks`). The blocks may be evicted meanwhile: check with `still_held`."""
        if not self.enabled:
            return []
        hashes: list[bytes] = []
        extend_block_hashes(hashes, token_ids, self.block_size, min(len(token_ids) // self.block_size, max_blocks))
        blocks = self.blocks
        return [(block_id, blocks[block_id].generation) for block_id in self.match(hashes, token_ids)]

    def still_held(self, run: list[tuple[int, int]]) -> int:
        """How many leading blocks of a `cached_run` still hold what they held then: a block's content is only
        overwritten after it is taken again, which bumps its generation."""
        for index, (block_id, generation) in enumerate(run):
            if self.blocks[block_id].generation != generation:
                return index
        return len(run)

    def recent_hashes(self, limit: int) -> list[bytes]:
        """The most recently registered block hashes, oldest first. A resize caught mid-copy (another thread) is
        retried, and a slightly stale view is fine for routing."""
        for _ in range(3):
            try:
                newest_first = list(itertools.islice(reversed(self.cached_block_ids), limit))
                return newest_first[::-1]
            except RuntimeError:
                continue
        return []
