"""The engine: requests in, one scheduled and executed step at a time, outputs out. No Ray, no HTTP."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AutoTokenizer

from replicas.block_manager import BlockManager
from replicas.config import EngineConfig
from replicas.detokenizer import detokenize_incrementally
from replicas.model_runner import ModelRunner
from replicas.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from replicas.sampler import Sampler
from replicas.sampling_params import SamplingParams
from replicas.scheduler import Scheduler, SchedulerOutput
from replicas.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

OutputKind = Literal["cumulative", "delta"]


class RequestError(ValueError):
    """A request the engine refuses; the message says why and what would be accepted."""


class PromptTooLongError(RequestError):
    pass


@dataclass(eq=False)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output_kind: OutputKind
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.num_samples and all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    """Continuous batching over a paged KV cache for one model on one device.

    Not thread-safe: one thread calls `add_request`, `abort` and `step` (the `AsyncEngine` owns that thread).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_num_threads(config.resolved_num_threads())
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model, trust_remote_code=False)
        self.model_runner = ModelRunner(config)
        self.max_model_len = self.model_runner.max_model_len
        contiguous = config.kv_allocation == "contiguous"
        self.block_manager = BlockManager(
            self.model_runner.num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching and not contiguous,
            reserve_tokens_per_seq=self.max_model_len if contiguous else None,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.scheduling_policy,
            config.long_prefill_token_threshold,
        )
        self.sampler = Sampler(config.seed, self.model_runner.device)
        self.eos_token_ids = _eos_token_ids(config.model, self.tokenizer)
        self.vocab_size = self.model_runner.vocab_size
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_steps = 0
        self.num_requests_finished = 0
        # Tokens computed by each recent step, oldest first: the replica drains it into its tokens-per-step
        # histogram. NOTE: a deque, so the engine thread can append while another thread pops from the left.
        self.recent_step_num_tokens: deque[int] = deque(maxlen=4096)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: object) -> "LLMEngine":
        return cls(EngineConfig(model=model, **kwargs))

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.config.model

    # --- requests ---------------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        output_kind: OutputKind = "cumulative",
        priority: int = 0,
    ) -> None:
        """Queue a request. Raises `RequestError` (with the reason) for a request that could never run.

        `priority` matters under the `priority` and `fair` scheduling policies: lower values run first."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is None:
            if prompt is None or prompt == "":
                raise RequestError("prompt is empty: give a non-empty prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        self._validate(prompt_token_ids, params)
        state = RequestState(request_id, prompt, list(prompt_token_ids), params, output_kind)
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            index=0,
            token_ids=list(prompt_token_ids),
            num_prompt_tokens=len(prompt_token_ids),
            params=params,
            priority=priority,
            generator=self._generator(params, 0),
        )
        state.seqs.append(seq)
        self.requests[request_id] = state
        self.scheduler.add(seq)

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise RequestError("prompt is empty: give a non-empty prompt or prompt_token_ids")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        max_tokens = params.max_tokens if params.max_tokens is not None else 1
        if num_prompt + max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt is {num_prompt} tokens and max_tokens is {max_tokens}: together they exceed "
                f"max_model_len {self.max_model_len}"
            )
        if params.num_samples > self.config.max_num_seqs:
            raise RequestError(
                f"{params.num_samples} samples per request exceed max_num_seqs {self.config.max_num_seqs}"
            )
        if len(params.stop) > self.config.max_stop_strings:
            raise RequestError(f"{len(params.stop)} stop strings exceed the limit of {self.config.max_stop_strings}")
        bad_bias = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad_bias:
            raise RequestError(f"logit_bias token id {bad_bias[0]} is outside the vocabulary [0, {self.vocab_size})")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad_stop:
            raise RequestError(f"stop token id {bad_stop[0]} is outside the vocabulary [0, {self.vocab_size})")

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        """Each sample of a seeded request draws from its own generator: same seed, same tokens, whatever the batch."""
        if params.seed is None or params.greedy:
            return None
        generator = torch.Generator(device=self.model_runner.device)
        generator.manual_seed((params.seed + index * 0x9E3779B97F4A7C15) % 2**63)
        return generator

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. Returns False when it is unknown or already finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the step ---------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once over the flattened batch, sample, and report what changed."""
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        self.num_steps += 1
        self.recent_step_num_tokens.append(scheduled.num_batched_tokens)
        sampling_items = [item for item in scheduled.scheduled if item.samples]
        try:
            logits = self.model_runner.execute(scheduled)
            self._advance(scheduled)
            sample_seqs: list[Sequence] = []
            logits_rows: list[int] = []
            for row, item in enumerate(sampling_items):
                seqs = self._fork_if_needed(item.seq)
                sample_seqs.extend(seqs)
                logits_rows.extend([row] * len(seqs))
            if len(logits_rows) != logits.shape[0]:
                logits = logits[torch.tensor(logits_rows, device=logits.device)]
            sampled = self.sampler(logits, sample_seqs)
        except Exception as error:  # noqa: BLE001 — one bad step fails its requests, never the engine
            logger.exception("step failed; failing its %d sequences", len(scheduled.scheduled))
            return self._fail(scheduled, error)

        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        for seq, token_id, token_logprobs in zip(sample_seqs, sampled.token_ids, sampled.logprobs):
            self._append_token(seq, token_id, token_logprobs, now)
            touched[seq.request_id] = self.requests[seq.request_id]
        self.num_generation_tokens += len(sample_seqs)
        return [output for state in touched.values() if (output := self._make_output(state)) is not None]

    def _advance(self, scheduled: SchedulerOutput) -> None:
        """Account for the K/V the step computed, and register blocks that became full for the prefix cache."""
        for item in scheduled.scheduled:
            seq = item.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.num_prompt_tokens += min(item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)

    def _fork_if_needed(self, seq: Sequence) -> list[Sequence]:
        """When a prompt of an `n > 1` request has been prefilled, fork its other samples off it, sharing blocks."""
        state = self.requests[seq.request_id]
        if seq.index != 0 or seq.num_output_tokens or len(state.seqs) >= state.params.num_samples:
            return [seq]
        for index in range(1, state.params.num_samples):
            child = seq.fork(next(self._seq_ids), index, self._generator(state.params, index))
            self.scheduler.add_forked(state.seqs[-1], child)
            state.seqs.append(child)
        return list(state.seqs)

    def _append_token(self, seq: Sequence, token_id: int, token_logprobs: object, now: float) -> None:
        seq.token_ids.append(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        if token_logprobs is not None:
            seq.cumulative_logprob += token_logprobs.logprob
            if seq.params.logprobs is not None:
                seq.logprobs.append(token_logprobs)
        params = seq.params
        reason: str | None = None
        min_tokens_done = seq.num_output_tokens >= params.min_tokens
        if token_id in self.eos_token_ids and not params.ignore_eos and min_tokens_done:
            reason = "stop"
        elif token_id in params.stop_token_ids and min_tokens_done:
            reason, seq.stop_reason = "stop", token_id
        else:
            reason = self._append_text(seq, detokenize_incrementally(self.tokenizer, seq), min_tokens_done)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
        if reason is None and (seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)

    @staticmethod
    def _append_text(seq: Sequence, delta: str, min_tokens_done: bool) -> str | None:
        """Add `delta` to the text; on a stop string (which may span tokens), cut the text there and stop."""
        if not delta:
            return None
        previous_length = len(seq.text)
        seq.text += delta
        if not seq.params.stop or not min_tokens_done:
            return None
        longest = max(len(stop) for stop in seq.params.stop)
        search_from = max(0, previous_length - longest + 1)
        hits = [(seq.text.find(stop, search_from), stop) for stop in seq.params.stop]
        hits = [(position, stop) for position, stop in hits if position >= 0]
        if not hits:
            return None
        position, stop = min(hits)
        end = position + len(stop) if seq.params.include_stop_str_in_output else position
        seq.text = seq.text[:end]
        seq.stop_reason = stop
        return "stop"

    def _fail(self, scheduled: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        failed = {item.seq.request_id for item in scheduled.scheduled}
        outputs = []
        for request_id in failed:
            state = self.requests[request_id]
            state.error = f"{type(error).__name__}: {error}"
            for seq in state.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
            while len(state.seqs) < state.params.num_samples:  # samples never forked still need an end
                state.seqs.append(state.seqs[0].fork(next(self._seq_ids), len(state.seqs), None))
                state.seqs[-1].status, state.seqs[-1].finish_reason = SequenceStatus.FINISHED, "abort"
            output = self._make_output(state)
            if output is not None:
                outputs.append(output)
        return outputs

    # --- outputs ----------------------------------------------------------------------------------------------

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        finished = state.finished
        params = state.params
        if params.num_samples > params.n and not finished:
            return None  # best_of: the n best are known only at the end
        delta = state.output_kind == "delta"
        seqs = state.seqs
        if params.num_samples > params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: params.n]
        completions = []
        for index, seq in enumerate(seqs):
            completion = self._completion(seq, index if params.num_samples > params.n else seq.index, delta)
            if completion is not None:
                completions.append(completion)
        if finished:
            self.requests.pop(state.request_id, None)
            self.num_requests_finished += 1
        first = state.seqs[0]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=first.num_prefix_cached_tokens,
            error=state.error,
            metrics=RequestMetrics(
                state.arrival_time, first.first_scheduled_time, first.first_token_time, first.last_token_time
            ),
        )

    @staticmethod
    def _completion(seq: Sequence, index: int, delta: bool) -> CompletionOutput | None:
        token_ids = seq.output_token_ids
        if not delta:
            return CompletionOutput(
                index, seq.text, token_ids, seq.finish_reason, seq.stop_reason,
                list(seq.logprobs) if seq.params.logprobs is not None else None, seq.cumulative_logprob,
            )
        new_tokens = token_ids[seq.num_emitted_tokens :]
        if not new_tokens and (not seq.is_finished or seq.finish_reported):
            return None
        text_end = len(seq.text)
        if seq.params.stop and not seq.is_finished:
            # Hold back what could be the start of a stop string: it is cut if the stop string completes.
            text_end = max(seq.num_emitted_chars, text_end - max(len(stop) for stop in seq.params.stop) + 1)
        new_text = seq.text[seq.num_emitted_chars : text_end]
        new_logprobs = seq.logprobs[seq.num_emitted_logprobs :] if seq.params.logprobs is not None else None
        seq.num_emitted_tokens, seq.num_emitted_chars = len(token_ids), text_end
        seq.num_emitted_logprobs = len(seq.logprobs)
        seq.finish_reported = seq.is_finished
        return CompletionOutput(
            index, new_text, new_tokens, seq.finish_reason, seq.stop_reason, new_logprobs, seq.cumulative_logprob
        )

    # --- statistics -------------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        block_manager = self.block_manager
        running = self.scheduler.running
        num_used_blocks = block_manager.num_total_blocks - block_manager.num_free_blocks
        return EngineStats(
            num_running=len(running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=block_manager.num_free_blocks,
            num_total_blocks=block_manager.num_total_blocks,
            num_cached_blocks=block_manager.num_cached_free_blocks,
            block_size=block_manager.block_size,
            kv_slots_allocated=num_used_blocks * block_manager.block_size,
            kv_slots_live=block_manager.live_slots(running),
            prefix_cache_queries=block_manager.num_prefix_query_tokens,
            prefix_cache_hits=block_manager.num_prefix_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_steps=self.num_steps,
            num_requests_finished=self.num_requests_finished,
        )


def _eos_token_ids(model_dir: str, tokenizer: object) -> set[int]:
    """EOS ids from generation_config.json (may be a list) and the tokenizer."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    except OSError:
        pass
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
