"""The engine's step loop: requests in, one scheduled and executed step at a time, outputs out. No Ray, no HTTP."""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import torch
from transformers import AutoTokenizer

from replicas.block_manager import BlockManager
from replicas.config import EngineConfig
from replicas.contract import ModelInfo, RequestOutput, ResumeState
from replicas.intake import OutputKind, Request, RequestError, RequestIntake
from replicas.model_runner import ModelRunner
from replicas.output_processor import OutputProcessor
from replicas.outputs import EngineStats
from replicas.prompt_logprobs import record_prompt_logprobs
from replicas.sampler import Sampler
from replicas.sampling_params import SamplingParams
from replicas.scheduler import Scheduler, SchedulerOutput
from replicas.sequence import Sequence, SequenceStatus
from replicas.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)


class LLMEngine:
    """Continuous batching over a paged KV cache for one model on one device.

    Each step: the scheduler picks the batch, the model runner computes its logits, the sampler picks tokens, the
    scheduler updates its sequences, and the output processor turns what changed into `RequestOutput`s.
    Not thread-safe: one thread calls `add_request`, `abort` and `step` (the `AsyncEngine` owns that thread).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_num_threads(config.resolved_num_threads())
        logger.info("torch threads: %d; OpenMP: OMP_WAIT_POLICY=%s GOMP_SPINCOUNT=%s", torch.get_num_threads(),
                    os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"))  # fmt: skip
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model, trust_remote_code=False)
        self.model_runner = ModelRunner(config)
        self.max_model_len = self.model_runner.max_model_len
        self.vocab_size = self.model_runner.vocab_size
        contiguous = config.kv_allocation == "contiguous"
        self.block_manager = BlockManager(
            self.model_runner.num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching and not contiguous,
            reserve_tokens_per_seq=self.max_model_len if contiguous else None,
        )
        self.eos_token_ids = frozenset(_eos_token_ids(config.model, self.tokenizer))
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.scheduling_policy,
            config.long_prefill_token_threshold,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )
        self.intake = RequestIntake(config, self.tokenizer, self.vocab_size, self.max_model_len)
        self.sampler = Sampler(config.seed, self.model_runner.device)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured_output = StructuredOutputManager(
            self.tokenizer, self.vocab_size, sorted(self.eos_token_ids),
            max_spec_bytes=config.max_structured_output_bytes, num_threads=config.structured_output_compile_threads,
            cache_size=config.structured_output_cache_size,
        )  # fmt: skip
        self.requests: dict[str, Request] = {}
        self.compiling: dict[str, Request] = {}  # requests waiting for their grammar (not scheduled until ready)
        self.num_steps = 0
        self.num_requests_finished = 0
        # Tokens computed by each recent step, oldest first: the replica drains it into its tokens-per-step
        # histogram. NOTE: a deque, so the engine thread can append while another thread pops from the left.
        self.recent_step_num_tokens: deque[int] = deque(maxlen=4096)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: object) -> LLMEngine:
        return cls(EngineConfig(model=model, **kwargs))

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.config.model

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model=self.model_name,
            max_model_len=self.max_model_len,
            block_size=self.config.block_size,
            max_num_seqs=self.config.max_num_seqs,
            num_total_blocks=self.block_manager.num_total_blocks,
            enable_prefix_caching=self.block_manager.enable_prefix_caching,
        )

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
        resume: ResumeState | None = None,
    ) -> None:
        """Queue a request. Raises `RequestError` (with the reason) for a request that could never run.

        `priority` matters under the `priority` and `fair` scheduling policies: lower values run first. `resume`:
        continue a request migrated from a lost replica (contract.ResumeState); its delta outputs carry new tokens
        only."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        request = self.intake.make_request(
            request_id, prompt, params or SamplingParams(), prompt_token_ids, output_kind, priority, resume
        )
        if request.params.structured_output is not None:  # raises for an oversized spec; compiles off this thread
            request.seqs[0].grammar = self.structured_output.state_for(request.params.structured_output)
            self.compiling[request_id] = request
        self.requests[request_id] = request
        self.output_processor.add(request.seqs[0], resume.num_text_chars if resume is not None else 0)
        self.scheduler.add(request.seqs[0])

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. Returns False when it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.compiling.pop(request_id, None)
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        self.output_processor.remove(request)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the step ---------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once over the flattened batch, sample, and report what changed."""
        failed = self._start_grammars() if self.compiling else []
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            if self.compiling and not failed:  # nothing to run until a grammar is compiled: wait a little for one
                self.structured_output.wait_any([r.seqs[0].grammar for r in self.compiling.values()], 0.01)
            return failed
        self.num_steps += 1
        self.recent_step_num_tokens.append(scheduled.num_batched_tokens)
        try:
            model_output = self.model_runner.execute(scheduled)
            if model_output.prompt_spans:
                record_prompt_logprobs(self.requests, model_output.prompt_logits, model_output.prompt_spans)
            logits = model_output.logits
            sampled_seqs, logits_rows = self._sampling_rows(scheduled)
            if len(logits_rows) != logits.shape[0]:
                logits = logits[torch.tensor(logits_rows, device=logits.device)]
            sampled = self.sampler(logits, sampled_seqs)
        except Exception as error:  # noqa: BLE001 — one bad step fails its requests, never the engine
            logger.exception("step failed; failing its %d sequences", len(scheduled.scheduled))
            return failed + self._fail(scheduled, error)

        self.scheduler.update_from_output(scheduled, sampled_seqs, sampled.token_ids)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for seq, token_logprobs in zip(sampled_seqs, sampled.logprobs):
            request = touched[seq.request_id] = self.requests[seq.request_id]
            if self.output_processor.on_token(seq, token_logprobs, now):
                self.scheduler.finish(seq, "stop")
            elif seq.grammar is not None and not seq.is_finished:
                grammar_error = seq.grammar.accept(seq.token_ids[-1])
                if grammar_error is not None:  # a dead state is the grammar's fault; a refused token, ours
                    self._mark_failed(request, grammar_error, 400 if seq.grammar.dead else 500)
                elif seq.grammar.terminated:  # the grammar is complete: nothing more may follow
                    self.scheduler.finish(seq, "stop")
        return failed + [output for request in touched.values() if (output := self._output(request)) is not None]

    def _start_grammars(self) -> list[RequestOutput]:
        """Give requests whose grammar finished compiling their matcher; fail those whose grammar did not compile."""
        outputs = []
        for request_id, request in list(self.compiling.items()):
            state = request.seqs[0].grammar
            if not state.compiling.done():
                continue
            del self.compiling[request_id]
            error = self.structured_output.start(state)
            # A resumed request's grammar replays the output it already has (contract.ResumeState).
            for token_id in request.seqs[0].output_token_ids:
                error = error or state.accept(token_id)
            if error is not None:  # a grammar that did not compile or allows nothing is the client's error
                self._mark_failed(request, error, 500 if state.ready and not state.dead else 400)
                if (output := self._output(request)) is not None:
                    outputs.append(output)
        return outputs

    def _sampling_rows(self, scheduled: SchedulerOutput) -> tuple[list[Sequence], list[int]]:
        """The sequences that get a token this step and the logits row each samples from. When the prompt of an
        `n > 1` request has been prefilled, its other samples fork off it here (sharing its blocks) and sample
        from the same row."""
        sampled_seqs: list[Sequence] = []
        logits_rows: list[int] = []
        row = 0
        for item in scheduled.scheduled:
            if not item.produces_token:
                continue
            seq = item.seq
            request = self.requests[seq.request_id]
            if seq.index == 0 and seq.num_output_tokens == 0 and len(request.seqs) < request.params.num_samples:
                for index in range(1, request.params.num_samples):
                    child = self.intake.fork(request, seq, index)
                    # The step's K/V is computed for the prompt the samples share (the scheduler advances `seq`).
                    child.num_computed_tokens += item.num_new_tokens
                    self.scheduler.add_forked(request.seqs[-2], child)
                    self.output_processor.add(child)
                sampled_seqs.extend(request.seqs)
                logits_rows.extend([row] * len(request.seqs))
            else:
                sampled_seqs.append(seq)
                logits_rows.append(row)
            row += 1
        return sampled_seqs, logits_rows

    def _output(self, request: Request) -> RequestOutput | None:
        finished = request.finished
        output = self.output_processor.make_output(request, finished)
        if finished:
            self.requests.pop(request.request_id, None)
            self.output_processor.remove(request)
            self.num_requests_finished += 1
        return output

    def _fail(self, scheduled: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        outputs = []
        for request_id in {item.seq.request_id for item in scheduled.scheduled}:
            request = self.requests[request_id]
            self._mark_failed(request, f"{type(error).__name__}: {error}")
            output = self._output(request)
            if output is not None:
                outputs.append(output)
        return outputs

    def _mark_failed(self, request: Request, message: str, status: int = 500) -> None:
        """End every sample of `request` with `abort` and the error (`status`: 400 when the request caused it); its
        output reports it."""
        request.error, request.error_status = message, status
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        while len(request.seqs) < request.params.num_samples:  # samples never forked still need an end
            child = self.intake.fork(request, request.seqs[0], len(request.seqs))
            child.status, child.finish_reason = SequenceStatus.FINISHED, "abort"
            self.output_processor.add(child)

    # --- statistics -------------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Counters maintained as the engine runs: O(1), cheap enough to take after every step."""
        block_manager = self.block_manager
        scheduler = self.scheduler
        num_used_blocks = block_manager.num_total_blocks - block_manager.num_free_blocks
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_free_blocks=block_manager.num_free_blocks,
            num_total_blocks=block_manager.num_total_blocks,
            num_cached_blocks=block_manager.num_cached_free_blocks,
            block_size=block_manager.block_size,
            kv_slots_allocated=num_used_blocks * block_manager.block_size,
            kv_slots_live=block_manager.num_live_slots,
            prefix_cache_queries=block_manager.num_prefix_query_tokens,
            prefix_cache_hits=block_manager.num_prefix_hit_tokens,
            num_imported_tokens=block_manager.num_imported_blocks * block_manager.block_size,
            num_preemptions=scheduler.num_preemptions,
            num_prompt_tokens=scheduler.num_prompt_tokens,
            num_generation_tokens=scheduler.num_generation_tokens,
            num_steps=self.num_steps,
            num_requests_finished=self.num_requests_finished,
            prefill_seconds_per_token=self.model_runner.prefill_seconds_per_token,
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
