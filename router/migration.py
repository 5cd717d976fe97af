"""Request migration: when the replica serving a request is lost mid-request, resume it on another.

The ingress remembers what its client was sent of each request (`Delivered`); when the replica call fails because
the replica died, became unreachable, or its engine loop died, the request is sent again with that output as a
`ResumeState` (replicas/contract.py): the new replica takes it as output already produced, so the client's stream
goes on with the next token — no token repeated or missing, text continuing mid-character or mid-stop-string, the
seeded random stream and penalties at the same position. At most `max_migrations` per request, and only within its
deadline; then the client gets the error it would have got without migration (503, or an SSE error event).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from replicas.contract import EngineUnavailableError, RequestOutput, ResumeState
from replicas.sampling_params import SamplingParams
from router.errors import APIError
from router.streaming import UNAVAILABLE_RETRY_AFTER_S, merge

logger = logging.getLogger(__name__)

# Opens one replica call: (request id, params, resume state or None) -> its output deltas.
StartCall = Callable[[str, SamplingParams, ResumeState | None], AsyncIterator[RequestOutput]]


@dataclass(frozen=True)
class MigrationPolicy:
    """How far the ingress goes to save a request whose replica was lost."""

    max_migrations: int = 2
    # No migration starts later than this after the request's first call, and a resumed call that produces nothing
    # this long after its loss ends (every replica gone). NOTE: from the loss, not the request's start: right after a
    # kill the survivor queues the migrated requests behind its own, and an old request must not be failed for it.
    # A new request's first output is due this long after its start, too (every replica gone: 503, not a hang).
    deadline_s: float = 120.0
    # NOTE: a pause before resuming gives Serve's router time to drop the dead replica (it learns from the failure),
    # so the retry does not land on it again and burn a migration.
    backoff_s: float = 0.2


def lost_replica_reason(error: BaseException) -> str | None:
    """Why the replica serving a call was lost (the metric's `reason`), or None when `error` is not that.

    The call's error reaches here as the `APIError` `router.streaming` made of it, caused by what Serve raised
    (a `RayTaskError` carries the replica's own exception as `cause`)."""
    cause = error.__cause__ if isinstance(error, APIError) else error
    cause = getattr(cause, "cause", None) or cause
    if isinstance(cause, ActorUnavailableError):
        return "actor_unavailable"
    if isinstance(cause, (ActorDiedError, RayActorError)):
        return "actor_died"
    if isinstance(cause, EngineUnavailableError):
        return "engine_dead"
    if isinstance(cause, DeploymentUnavailableError):
        return "no_replica"
    return None


@dataclass
class Delivered:
    """What a request's client has been sent so far, per completion index: enough to resume it elsewhere."""

    token_ids: dict[int, list[int]] = field(default_factory=dict)
    num_chars: dict[int, int] = field(default_factory=dict)
    cumulative_logprob: dict[int, float] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    num_outputs: int = 0
    # Added to the cumulative logprob the resumed replica reports (it counts from the cut).
    logprob_base: dict[int, float] = field(default_factory=dict)

    def record(self, output: RequestOutput) -> RequestOutput:
        """Note an output about to be sent, after making a resumed replica's output read as one stream's: the
        prompt (and its logprobs) once, cumulative logprobs from the start."""
        if self.num_outputs:
            output.prompt_token_ids, output.prompt_logprobs = [], None
        self.num_outputs += 1
        for completion in output.outputs:
            index = completion.index
            self.token_ids.setdefault(index, []).extend(completion.token_ids)
            self.num_chars[index] = self.num_chars.get(index, 0) + len(completion.text)
            if completion.cumulative_logprob is not None:
                completion.cumulative_logprob += self.logprob_base.get(index, 0.0)
                self.cumulative_logprob[index] = completion.cumulative_logprob
            if completion.finish_reason is not None:
                self.finished.add(index)
        return output

    def complete(self, n: int) -> bool:
        """Whether all `n` choices were sent their finish: a replica lost after that loses nothing."""
        return len(self.finished) >= n

    @property
    def num_tokens(self) -> int:
        return sum(len(token_ids) for token_ids in self.token_ids.values())

    def resume(self, params: SamplingParams) -> list[Resumption] | None:
        """The next calls: one for the whole request, or one per unfinished choice of an `n > 1` request that already
        has tokens out; None when the request cannot be resumed.

        NOTE: the engine forks samples after a fresh prompt's prefill only, so a cut `n > 1` request goes on as one
        one-sample call per choice (`ResumeState.sample_index` keeps each seeded stream); with nothing sent yet it is
        simply sent again, whole. `best_of > n` reports only at the end, so it has never sent tokens when cut."""
        if self.num_tokens == 0:
            if self.num_outputs and params.prompt_logprobs is not None:
                params = params.model_copy(update={"prompt_logprobs": None})  # already sent
            return [Resumption(None, params, None)]
        if params.best_of not in (None, params.n):
            return None
        indexes = [index for index in range(params.n) if index not in self.finished]
        if params.max_tokens is not None and any(len(self.token_ids.get(i, [])) >= params.max_tokens for i in indexes):
            return None  # nothing left to generate: the replica died before saying so
        # NOTE: the same max_tokens and min_tokens: the engine counts the resumed tokens as output against them.
        update: dict[str, Any] = {"prompt_logprobs": None}
        if params.n == 1:
            self.logprob_base = dict(self.cumulative_logprob)
            return [Resumption(None, params.model_copy(update=update), self._state(0))]
        update.update(n=1, best_of=None)
        return [Resumption(index, params.model_copy(update=update), self._state(index)) for index in indexes]

    def _state(self, index: int) -> ResumeState:
        return ResumeState(list(self.token_ids.get(index, [])), self.num_chars.get(index, 0), sample_index=index)

    def choice(self, index: int) -> Delivered:
        """What was delivered of choice `index`, as the one-sample request that resumes it sees its own output."""
        return Delivered(
            token_ids={0: list(self.token_ids.get(index, []))}, num_chars={0: self.num_chars.get(index, 0)},
            num_outputs=self.num_outputs, logprob_base={0: self.cumulative_logprob.get(index, 0.0)},
            cumulative_logprob={0: self.cumulative_logprob.get(index, 0.0)},
        )  # fmt: skip


@dataclass(frozen=True)
class Resumption:
    """One call that resumes a request: the whole of it (`index` None), or choice `index` of an `n > 1` one."""

    index: int | None
    params: SamplingParams
    resume: ResumeState | None


async def migrating_outputs(
    request_id: str, params: SamplingParams, start: StartCall, policy: MigrationPolicy,
    on_migration: Callable[[str], None] = lambda reason: None,
) -> AsyncIterator[RequestOutput]:  # fmt: skip
    """The output deltas of a request, resumed on another replica (at most `policy.max_migrations` times, within
    `policy.deadline_s`) when the one serving it is lost. `on_migration(reason)` counts each; `gave_up` when the
    request's error is passed on instead."""
    calls = _Calls(start, policy, on_migration, time.monotonic() + policy.deadline_s)
    async for output in calls.outputs(request_id, params, Delivered(), request_id, None, None, 0):
        yield output


@dataclass
class _Calls:
    """The replica calls of one request, its migrations and their shared deadline."""

    start: StartCall
    policy: MigrationPolicy
    on_migration: Callable[[str], None]
    deadline: float

    async def outputs(
        self, request_id: str, params: SamplingParams, delivered: Delivered, call_id: str,
        resume: ResumeState | None, lost: APIError | None, migrations: int, wait_until: float = 0.0,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """`params`' deltas from `call_id` on (resumed from `resume` after `lost`, if given: its first output due by
        `wait_until`), migrated when lost. `migrations`: how many the request already used (a resumed choice counts
        its request's)."""
        call_params = params
        while True:
            stream = self.start(call_id, call_params, resume)
            try:
                if lost is not None:
                    yield delivered.record(await _first_within(stream, wait_until, lost, self.on_migration))
                elif migrations == 0:
                    first = await _first_of_new_call(stream, self.deadline, self.policy.deadline_s)
                    if first is None:
                        return
                    yield delivered.record(first)
                async for output in stream:
                    yield delivered.record(output)
                return
            except APIError as error:
                reason = lost_replica_reason(error)
                if reason is None or error is lost:
                    raise
                if delivered.complete(params.n):
                    return  # lost between its last output and the end of the call: nothing to resume
                lost, wait_until = error, time.monotonic() + self.policy.deadline_s
                plans = delivered.resume(params)
                if (plans is None or migrations == self.policy.max_migrations
                        or time.monotonic() + self.policy.backoff_s > self.deadline):  # fmt: skip
                    self.on_migration("gave_up")
                    logger.warning("request %s lost its replica (%s); not resumed", request_id, reason)
                    raise
                self.on_migration(reason)
                migrations += 1
                call_id = f"{request_id}-m{migrations}"
                logger.warning("request %s lost its replica (%s) after %d tokens; resuming it as %s (%d calls)",
                               request_id, reason, delivered.num_tokens, call_id, len(plans))  # fmt: skip
                await asyncio.sleep(self.policy.backoff_s)
                if plans[0].index is None:
                    call_params, resume = plans[0].params, plans[0].resume
                    continue
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            break  # an n > 1 request cut after tokens went out: its choices go on one call each
        async for output in self._choices(request_id, plans, delivered, lost, migrations, wait_until):
            yield delivered.record(output)

    async def _choices(
        self, request_id: str, plans: list[Resumption], delivered: Delivered, lost: APIError, migrations: int,
        wait_until: float,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """The resumed choices' deltas as the request's: each under its own index, finished when all are."""
        gave_up = False

        def count_once(reason: str) -> None:  # the request gives up once, however many of its choices fail
            nonlocal gave_up
            if reason == "gave_up" and gave_up:
                return
            gave_up = gave_up or reason == "gave_up"
            self.on_migration(reason)

        choice_calls = replace(self, on_migration=count_once)
        streams = []
        for plan in plans:
            choice_id = f"{request_id}-c{plan.index}"
            outputs = choice_calls.outputs(choice_id, plan.params, delivered.choice(plan.index), f"{choice_id}-m{migrations}",
                                   plan.resume, lost, migrations, wait_until)  # fmt: skip
            streams.append(_as_choice(plan.index, outputs))
        unfinished = set(range(len(plans)))
        async for position, output in merge(streams):  # type: ignore[arg-type]
            if output.finished:
                unfinished.discard(position)
            output.finished = not unfinished
            yield output


async def _as_choice(index: int, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """A one-sample request's deltas as choice `index`'s."""
    try:
        async for output in outputs:
            for completion in output.outputs:
                completion.index = index
            yield output
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]


async def _first_output(stream: AsyncIterator[RequestOutput], deadline: float) -> RequestOutput | None:
    """A call's first output (None: it ended without one); `asyncio.TimeoutError` at `deadline`. NOTE: with every
    replica gone, Serve holds a call until one is back (a deployment that was once healthy stays "available" with
    none running), which may be never: every call's first output has a deadline."""
    try:
        return await asyncio.wait_for(anext(stream), max(0.0, deadline - time.monotonic()))
    except StopAsyncIteration:
        return None


async def _first_of_new_call(
    stream: AsyncIterator[RequestOutput], deadline: float, deadline_s: float
) -> RequestOutput | None:
    """A new request's first output (None: it ended without one), or 503 `engine_unavailable` at its deadline."""
    try:
        return await _first_output(stream, deadline)
    except asyncio.TimeoutError:
        raise APIError(
            503, f"no engine replica produced output within {deadline_s:g} s (none running, or all saturated): "
            "retry shortly", code="engine_unavailable", retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
        ) from None  # fmt: skip


async def _first_within(
    stream: AsyncIterator[RequestOutput], deadline: float, lost: APIError, on_migration: Callable[[str], None]
) -> RequestOutput:
    """A resumed call's first output, or `lost` re-raised at `deadline` (or when it ends without one)."""
    try:
        first = await _first_output(stream, deadline)
    except asyncio.TimeoutError:
        first = None
    if first is None:
        on_migration("gave_up")
        raise lost from lost.__cause__  # the same error the lost call ended with
    return first
