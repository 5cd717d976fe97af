"""The per-sequence record the scheduler, block manager and model runner share: tokens, KV state, status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from replicas.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    """One stream of tokens: a prompt plus the tokens sampled after it. `n > 1` requests fork several.

    What the caller sees of it (text, logprobs, what was already reported) is the output processor's."""

    seq_id: int
    request_id: str
    index: int  # which of the request's samples this is
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    rng_key: int | None = None  # seeded requests: the key of this sample's random stream (see sampler.py)
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first under the priority and fair policies
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    # Chained hashes of the leading full blocks of `token_ids`, each computed once (block_manager extends it).
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks registered in (or taken from) the prefix cache
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    # Structured outputs: the `GrammarState` (replicas/structured_output.py) of a constrained sequence. NOTE: kept
    # through preemption: the tokens it accepted stay in `token_ids` and are recomputed, not resampled.
    grammar: Any = None

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
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether the steps computing its prompt must return logits for every prompt position: prompt logprobs
        were asked for and are not complete yet (they are once the first token is sampled)."""
        return self.params.prompt_logprobs is not None and self.index == 0 and self.num_output_tokens == 0

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    def fork(self, seq_id: int, index: int, rng_key: int | None) -> Sequence:
        """A sibling with the same tokens and computed state; the caller makes it share the KV blocks."""
        return Sequence(
            seq_id=seq_id,
            request_id=self.request_id,
            index=index,
            token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens,
            params=self.params,
            rng_key=rng_key,
            arrival_time=self.arrival_time,
            priority=self.priority,
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            num_cached_tokens=self.num_cached_tokens,
            block_hashes=list(self.block_hashes),
            num_registered_blocks=self.num_registered_blocks,
            first_scheduled_time=self.first_scheduled_time,
        )
