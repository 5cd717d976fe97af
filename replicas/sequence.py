"""The per-sequence record shared by the scheduler, block manager, model runner and sampler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from replicas.contract import TokenLogprobs
from replicas.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    """One stream of tokens: a prompt plus the tokens sampled after it. `n > 1` requests fork several."""

    seq_id: int
    request_id: str
    index: int  # which of the request's samples this is
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first under the priority and fair policies
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    num_prefix_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of the leading full, registered blocks
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Incremental detokenization state.
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    # What has been reported to the caller (for delta outputs).
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0
    num_emitted_logprobs: int = 0
    finish_reported: bool = False
    # Timestamps (monotonic seconds) for metrics.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    def fork(self, seq_id: int, index: int, generator: torch.Generator | None) -> "Sequence":
        """A sibling with the same tokens and computed state; the caller makes it share the KV blocks."""
        child = Sequence(
            seq_id=seq_id,
            request_id=self.request_id,
            index=index,
            token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens,
            params=self.params,
            arrival_time=self.arrival_time,
            priority=self.priority,
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            num_prefix_cached_tokens=self.num_prefix_cached_tokens,
            block_hashes=list(self.block_hashes),
            generator=generator,
            first_scheduled_time=self.first_scheduled_time,
        )
        return child
