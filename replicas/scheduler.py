"""Continuous batching: which sequences run in the next step and how many tokens each computes, and the
bookkeeping after the step (computed tokens, new tokens, token-level stops, finished sequences)."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from replicas.block_manager import BlockManager
from replicas.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

SchedulingPolicy = Literal["fcfs", "priority", "fair"]


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes, starting at seq.num_computed_tokens

    # Whether this step reaches the end of the sequence and so produces its next token (set when scheduled).
    produces_token: bool = False

    def __post_init__(self) -> None:
        self.produces_token = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences that stopped running since the previous step (finished, aborted or preempted): the model runner
    # gives back their rows of the persistent batch.
    released_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Continuous batching over a token budget, admitting by the configured policy (fcfs, priority or fair).

    Each step first keeps every running sequence going (one token for a decode, the next chunk for a prompt
    being prefilled), then admits waiting sequences while `max_num_seqs`, the token budget and free blocks allow.
    A prompt longer than the remaining budget is prefilled in chunks over several steps, so decodes keep flowing.
    When a running sequence needs a block and none is free, the most recently admitted sequence is preempted:
    its blocks are freed and it goes back to the front of the queue, to be recomputed later.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: SchedulingPolicy = "fcfs",
        long_prefill_token_threshold: int = 256,
        eos_token_ids: frozenset[int] = frozenset(),
        max_model_len: int | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.released_seq_ids: list[int] = []
        self.num_prompt_tokens = 0  # prompt tokens computed so far (prefix hits excluded)
        self.num_generation_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens

        if self.policy != "fcfs" and self.waiting:
            self.waiting = deque(sorted(self.waiting, key=self._admission_key))
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new_tokens = min(self._chunk_cap(seq), budget)
            while not self.block_manager.allocate_slots(seq, num_new_tokens):
                victim = self._pick_victim(index)
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is seq:
                    break
            else:
                output.scheduled.append(ScheduledSequence(seq, num_new_tokens))
                budget -= num_new_tokens
                index += 1

        # Sequences that will exist once admitted prompts fork into their samples count against max_num_seqs now.
        num_seqs = sum(_group_size(seq) for seq in self.running)
        in_flight = self._blocks_in_flight() if self.waiting and self.block_manager.enable_prefix_caching else None
        deferred: list[Sequence] = []
        # NOTE: admitting new work in a step that had to preempt would only preempt again next step.
        while self.waiting and budget > 0 and not output.preempted:
            seq = self.waiting[0]
            if seq.grammar is not None and not seq.grammar.ready:
                deferred.append(self.waiting.popleft())  # its grammar is still compiling: others go first
                continue
            if num_seqs + _group_size(seq) > self.max_num_seqs:
                break
            # NOTE: a cached block holds K/V but no logits, so a request for prompt logprobs skips the prefix cache
            # and computes its whole prompt (its blocks are still registered for others).
            skips_cache = seq.needs_prompt_logits
            prefix_block_ids = [] if skips_cache else self.block_manager.lookup_prefix(seq)
            if in_flight is not None:
                hashes = self.block_manager.block_hashes(seq)
                num_hit = len(prefix_block_ids)
                if not skips_cache and num_hit < len(hashes) and hashes[num_hit] in in_flight:
                    # Its next block is being prefilled for another sequence right now: wait a step or two and
                    # reuse it instead of computing the same prefix twice (requests sharing a system prompt
                    # tend to arrive together).
                    deferred.append(self.waiting.popleft())
                    continue
            num_cached_tokens = len(prefix_block_ids) * self.block_manager.block_size
            num_new_tokens = min(self._chunk_cap(seq, num_cached_tokens), budget)
            if not self.block_manager.allocate_slots(seq, num_new_tokens, prefix_block_ids):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_cached_tokens = num_cached_tokens
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            output.scheduled.append(ScheduledSequence(seq, num_new_tokens))
            budget -= num_new_tokens
            num_seqs += _group_size(seq)
            if in_flight is not None:
                in_flight.update(hashes[len(prefix_block_ids) :])
        self.waiting.extendleft(reversed(deferred))
        if self.policy == "fair" and budget > 0:
            budget = self._extend_capped_prefills(output, budget)

        output.blocks_to_copy = self.block_manager.take_pending_copies()
        if output.scheduled:  # an empty step is not run: its releases wait for the next one
            output.released_seq_ids, self.released_seq_ids = self.released_seq_ids, []
        return output

    def _admission_key(self, seq: Sequence) -> tuple:
        """Order of the waiting queue under the priority and fair policies (preempted sequences keep their age)."""
        if self.policy == "priority":
            return (seq.priority, seq.arrival_time)
        is_long = seq.num_tokens - seq.num_computed_tokens > self.long_prefill_token_threshold
        return (seq.priority, is_long, seq.arrival_time)

    def _chunk_cap(self, seq: Sequence, num_cached_tokens: int = 0) -> int:
        """Tokens `seq` may compute this step before the budget: all of them, except long prefills under `fair`."""
        remaining = seq.num_tokens - max(seq.num_computed_tokens, num_cached_tokens)
        if self.policy == "fair":
            return min(remaining, self.long_prefill_token_threshold)
        return remaining

    def _extend_capped_prefills(self, output: SchedulerOutput, budget: int) -> int:
        """Give budget nobody else wanted to the long prefills the fair policy capped, so they are not slowed down
        when there is no competition."""
        for item in output.scheduled:
            remaining = item.seq.num_tokens - item.seq.num_computed_tokens - item.num_new_tokens
            extra = min(remaining, budget)
            if extra > 0 and self.block_manager.allocate_slots(item.seq, item.num_new_tokens + extra):
                item.num_new_tokens += extra
                budget -= extra
        return budget

    def _pick_victim(self, first_unscheduled: int) -> Sequence:
        """The running sequence to preempt, among those not yet scheduled this step: the most recently admitted, or
        under a priority policy the least urgent."""
        if self.policy == "fcfs":
            return self.running.pop()
        candidates = self.running[first_unscheduled:]
        victim = max(reversed(candidates), key=lambda seq: (seq.priority, seq.arrival_time))
        self.running.remove(victim)
        return victim

    def _blocks_in_flight(self) -> set[bytes]:
        """Hashes of full blocks that running sequences are still prefilling (computed, but not yet registered)."""
        in_flight: set[bytes] = set()
        for seq in self.running:
            if seq.is_prefilling:
                in_flight.update(self.block_manager.block_hashes(seq)[seq.num_registered_blocks :])
        return in_flight

    def update_from_output(
        self, output: SchedulerOutput, sampled_seqs: list[Sequence], sampled_token_ids: list[int]
    ) -> list[Sequence]:
        """After a step: account for the K/V it computed, append each sampled token, and finish sequences that hit
        EOS, a stop token, `max_tokens` or the context length. Returns the sequences finished now."""
        block_manager = self.block_manager
        for item in output.scheduled:
            seq = item.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.num_prompt_tokens += min(item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            block_manager.advance(seq, item.num_new_tokens)
            block_manager.cache_full_blocks(seq)
        self.num_generation_tokens += len(sampled_seqs)
        finished: list[Sequence] = []
        for seq, token_id in zip(sampled_seqs, sampled_token_ids):
            seq.token_ids.append(token_id)
            reason = self._token_stop(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _token_stop(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return "stop"
            if token_id in params.stop_token_ids:
                seq.stop_reason = token_id
                return "stop"
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
        if (max_tokens is not None and seq.num_output_tokens >= max_tokens) or (
            self.max_model_len is not None and seq.num_tokens >= self.max_model_len
        ):
            return "length"
        return None

    def add_forked(self, parent: Sequence, child: Sequence) -> None:
        """Run `child` right after `parent`, sharing its blocks."""
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.insert(self.running.index(parent) + 1, child)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues and free its blocks; they serve others from the next step on."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self.released_seq_ids.append(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s (seq %d): out of KV blocks", seq.request_id, seq.seq_id)
        self.block_manager.free(seq)
        self.released_seq_ids.append(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)


def _group_size(seq: Sequence) -> int:
    """Sequences `seq` stands for: all of its request's samples while its prompt has not forked yet."""
    return seq.params.num_samples if seq.index == 0 and seq.num_output_tokens == 0 else 1
