"""What the engine hands back: request outputs (the shapes vLLM users know) and engine statistics."""

from __future__ import annotations

from dataclasses import dataclass

from replicas.sequence import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request passed each stage (monotonic seconds), as vLLM's `RequestOutput.metrics`; None: not yet.

    Taken from the request's first sequence. The replica turns them into queue time, time to first token,
    inter-token and end-to-end latency (`replicas/metrics.py`).
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None  # at the end of a request: when its last token was sampled


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    error: str | None = None  # why the request was failed, when the engine failed it
    metrics: RequestMetrics | None = None


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

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0

    @property
    def kv_memory_efficiency(self) -> float:
        """Live slots over allocated slots: 1.0 means no reserved-but-unused KV memory."""
        return self.kv_slots_live / self.kv_slots_allocated if self.kv_slots_allocated else 1.0
