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
    # For the request router's wait estimates: steps each running request still needs at most (its remaining
    # `max_tokens`, plus one while prefilling; EOS may end it sooner), fewest first; and the step cost model's fit.
    remaining_steps: tuple[int, ...] = ()
    step_s: float = 0.0  # recent mean step duration (0 before the first step)
    s_per_token: float = 0.0  # recent marginal cost of one more token in a step (what a prefilled token costs)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0

    @property
    def kv_memory_efficiency(self) -> float:
        """Live slots over allocated slots: 1.0 means no reserved-but-unused KV memory."""
        return self.kv_slots_live / self.kv_slots_allocated if self.kv_slots_allocated else 1.0


class StepCostModel:
    """A step's duration as fixed cost + cost per batched token, fitted by exponentially weighted least squares
    over recent steps (O(1) per step)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self._weight = self._tokens = self._seconds = self._tokens_sq = self._tokens_seconds = 0.0

    def add(self, num_tokens: int, seconds: float) -> None:
        decay = self.decay
        self._weight = decay * self._weight + 1.0
        self._tokens = decay * self._tokens + num_tokens
        self._seconds = decay * self._seconds + seconds
        self._tokens_sq = decay * self._tokens_sq + num_tokens * num_tokens
        self._tokens_seconds = decay * self._tokens_seconds + num_tokens * seconds

    @property
    def step_s(self) -> float:
        return self._seconds / self._weight if self._weight else 0.0

    @property
    def s_per_token(self) -> float:
        """The fitted slope; while recent steps were too alike in size to fit one (or the fit is not positive),
        the mean seconds per token, an upper bound."""
        if not self._weight:
            return 0.0
        mean_tokens = self._tokens / self._weight
        variance = self._tokens_sq / self._weight - mean_tokens**2
        if variance > 1.0:
            slope = (self._tokens_seconds / self._weight - mean_tokens * self.step_s) / variance
            if slope > 0:
                return slope
        return self.step_s / mean_tokens if mean_tokens else 0.0

