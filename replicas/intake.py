"""Request intake: validates a request against the engine's limits and turns it into its first sequence."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Literal

from replicas.config import EngineConfig
from replicas.contract import ResumeState, TokenLogprobs
from replicas.sampler import rng_key
from replicas.sampling_params import SamplingParams
from replicas.sequence import Sequence

OutputKind = Literal["cumulative", "delta"]


class RequestError(ValueError):
    """A request the engine refuses; the message says why and what would be accepted. `param`: the request field
    at fault, when one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(RequestError):
    pass


@dataclass(eq=False)
class Request:
    """One request in the engine: its prompt, parameters, and the sequences (samples) drawn for it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output_kind: OutputKind
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    error: str | None = None
    error_status: int = 500  # 400 when the request itself made it fail (a grammar this vocabulary cannot go on in)
    # With `params.prompt_logprobs`: one entry per prompt token scored so far; the first token has none (None).
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.num_samples and all(seq.is_finished for seq in self.seqs)


class RequestIntake:
    """Checks requests against what the engine can run and numbers their sequences."""

    def __init__(self, config: EngineConfig, tokenizer: object, vocab_size: int, max_model_len: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._seq_ids = itertools.count()

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int] | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None,
        output_kind: OutputKind,
        priority: int,
        resume: ResumeState | None = None,
    ) -> Request:
        """A validated request with its first sequence. Raises `RequestError` for one that could never run.

        `resume`: output tokens the request already produced elsewhere; they follow the prompt as output tokens."""
        if isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is None:
            if prompt is None or prompt == "":
                raise RequestError("prompt is empty: give a non-empty prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        self.validate(prompt_token_ids, params)
        resumed = self.validate_resume(params, resume) if resume is not None else []
        request = Request(request_id, prompt, prompt_token_ids, params, output_kind, priority)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        seq = Sequence(
            seq_id=self.next_seq_id(),
            request_id=request_id,
            index=0,
            token_ids=list(prompt_token_ids) + resumed,
            num_prompt_tokens=len(prompt_token_ids),
            params=params,
            rng_key=self.rng_key(params, resume.sample_index if resume is not None else 0),
            arrival_time=request.arrival_time,
            priority=priority,
        )
        request.seqs.append(seq)
        return request

    def fork(self, request: Request, parent: Sequence, index: int) -> Sequence:
        """Sample `index` of `request`, forked from its prefilled first sequence."""
        child = parent.fork(self.next_seq_id(), index, self.rng_key(request.params, index))
        if parent.grammar is not None:
            child.grammar = parent.grammar.fork()  # its own matcher, from the parent's state
        request.seqs.append(child)
        return child

    def next_seq_id(self) -> int:
        return next(self._seq_ids)

    @staticmethod
    def rng_key(params: SamplingParams, index: int) -> int | None:
        """Each sample of a seeded request draws from its own stream: same seed, same tokens, whatever the batch."""
        if params.seed is None or params.greedy:
            return None
        return rng_key(params.seed, index)

    def validate_resume(self, params: SamplingParams, resume: ResumeState) -> list[int]:
        """The resumed output tokens, checked: one sample (NOTE: forking happens after a fresh prompt's prefill,
        so `n > 1` continuations go one per request), no prompt logprobs (already delivered), room to go on."""
        resumed = list(resume.output_token_ids)
        if params.num_samples > 1:
            raise RequestError("a resumed request must have n = 1 and no best_of", "resume")
        if params.prompt_logprobs is not None:
            raise RequestError("a resumed request cannot ask for prompt_logprobs again", "resume")
        if params.max_tokens is not None and len(resumed) >= params.max_tokens:
            raise RequestError(f"{len(resumed)} resumed tokens leave none of max_tokens {params.max_tokens}", "resume")
        bad = [t for t in resumed if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"resumed token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", "resume")
        return resumed

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        num_prompt = len(prompt_token_ids)
        vocab_size = self.vocab_size
        if num_prompt == 0:
            raise RequestError("prompt is empty: give a non-empty prompt or prompt_token_ids")
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
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
        bad_bias = [t for t in params.logit_bias if not 0 <= t < vocab_size]
        if bad_bias:
            raise RequestError(f"logit_bias token id {bad_bias[0]} is outside the vocabulary [0, {vocab_size})")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
        if bad_stop:
            raise RequestError(f"stop token id {bad_stop[0]} is outside the vocabulary [0, {vocab_size})")
