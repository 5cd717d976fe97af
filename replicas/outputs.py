"""What the engine hands back: request outputs (defined in `replicas.contract`) and engine statistics."""

from __future__ import annotations

from dataclasses import dataclass

from replicas.contract import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["CompletionOutput", "EngineStats", "RequestMetrics", "RequestOutput"]


@dataclass
class EngineStats:
    """A snapshot the replica reports to the request router and to metrics."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int  # free blocks that still hold a reusable prefix
    block_size: int
    kv_slots_allocated: int  # slots in blocks some sequence holds
    kv_slots_live: int  # of those, slots holding a computed token
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
    num_prompt_tokens: int  # prompt tokens computed so far (prefix hits excluded)
    num_generation_tokens: int
    num_steps: int
    num_requests_finished: int
    prefill_seconds_per_token: float = 0.0  # of recent prefill-heavy steps; 0.0 before any ran
    num_imported_tokens: int = 0  # prefix tokens whose K/V came from another replica (replicas/kv_transfer.py)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0

    @property
    def kv_memory_efficiency(self) -> float:
        """Live slots over allocated slots: 1.0 means no reserved-but-unused KV memory."""
        return self.kv_slots_live / self.kv_slots_allocated if self.kv_slots_allocated else 1.0
