"""Request migration's bookkeeping without Ray: what a resumed call is sent, what the client gets across the cut
(tokens, text, usage), and the bounds (max_migrations, the deadline, which errors and requests migrate)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from ray.exceptions import ActorDiedError

from replicas.contract import CompletionOutput, EngineUnavailableError, RequestOutput, ResumeState
from replicas.sampling_params import SamplingParams
from router import responses
from router.errors import APIError
from router.migration import MigrationPolicy, lost_replica_reason, migrating_outputs
from router.streaming import prime, to_api_error

PROMPT = [11, 12, 13]
# The whole output: token i has text TEXTS[i] (a multi-character piece split across tokens, a leading space).
TOKENS = [101, 102, 103, 104, 105, 106]
TEXTS = ["He", "llo", " wo", "rld", "!", ""]
FAST = MigrationPolicy(max_migrations=2, deadline_s=5.0, backoff_s=0.0)


@dataclass
class Call:
    request_id: str
    params: SamplingParams
    resume: ResumeState | None


@dataclass
class FakeReplicas:
    """Serves the scripted output from wherever `resume` says; each call dies (as Serve reports a dead actor) after
    `deliver[k]` outputs, or serves to the end once the list is used up. `hang`: resumed calls never start."""

    deliver: list[int]
    error: BaseException = field(default_factory=ActorDiedError)
    hang: bool = False
    none_running: bool = False  # no call ever starts (Serve holds calls while no replica runs)
    hold_back_second: bool = False  # the first call sends token 2 without its text (a possible stop-string prefix)
    die_after_last: bool = False  # the first call dies after its final output, before the call ends
    calls: list[Call] = field(default_factory=list)

    def __call__(self, request_id: str, params: SamplingParams, resume: ResumeState | None) -> AsyncIterator:
        self.calls.append(Call(request_id, params, resume))
        return self._outputs(len(self.calls) - 1, resume)

    async def _outputs(self, call: int, resume: ResumeState | None) -> AsyncIterator[RequestOutput]:
        if (self.hang and call > 0) or self.none_running:
            await asyncio.sleep(3600)
        start = len(resume.output_token_ids) if resume else 0
        held_back = "".join(TEXTS[:start])[resume.num_text_chars :] if resume else ""
        for position in range(start, len(TOKENS)):
            if call < len(self.deliver) and position - start == self.deliver[call]:
                raise to_api_error(self.error) from self.error
            await asyncio.sleep(0)
            text = (held_back if position == start else "") + TEXTS[position]
            if self.hold_back_second and call == 0 and position == 1:
                text = ""
            finished = position == len(TOKENS) - 1
            completion = CompletionOutput(0, text, [TOKENS[position]], "length" if finished else None,
                                          cumulative_logprob=-1.0 * (position - start + 1))  # fmt: skip
            yield RequestOutput("r", None, list(PROMPT), [completion], finished, num_cached_tokens=2)
        if self.die_after_last and call == 0:
            raise to_api_error(self.error) from self.error


def collect(replicas: FakeReplicas, params: SamplingParams | None = None,
            policy: MigrationPolicy = FAST) -> tuple[list[RequestOutput], list[str]]:  # fmt: skip
    reasons: list[str] = []

    async def go() -> list[RequestOutput]:
        stream = migrating_outputs("req", params or SamplingParams(max_tokens=6, seed=3), replicas, policy,
                                   reasons.append)  # fmt: skip
        return [output async for output in stream]

    return asyncio.run(go()), reasons


def test_a_lost_call_is_resumed_with_what_the_client_already_has() -> None:
    replicas = FakeReplicas(deliver=[2])
    outputs, reasons = collect(replicas)
    assert [token for output in outputs for c in output.outputs for token in c.token_ids] == TOKENS
    assert "".join(c.text for output in outputs for c in output.outputs) == "".join(TEXTS)
    assert reasons == ["actor_died"]
    first, resumed = replicas.calls
    assert first.resume is None and first.request_id == "req"
    assert resumed.request_id == "req-m1"
    assert resumed.resume == ResumeState(TOKENS[:2], len("Hello"))
    # The same parameters: the engine counts the resumed tokens against max_tokens / min_tokens itself.
    assert resumed.params == first.params


def test_the_client_sees_one_stream_prompt_once_and_cumulative_logprobs_from_the_start() -> None:
    outputs, _ = collect(FakeReplicas(deliver=[3]))
    assert [bool(output.prompt_token_ids) for output in outputs] == [True] + [False] * (len(outputs) - 1)
    assert [output.outputs[0].cumulative_logprob for output in outputs] == [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]


def test_usage_counts_the_original_prompt_and_every_completion_token_once() -> None:
    async def go() -> tuple[str, responses.UsageCounter]:
        replicas = FakeReplicas(deliver=[1, 2])
        (stream,) = await prime([migrating_outputs("req", SamplingParams(max_tokens=6), replicas, FAST)])
        usage = responses.UsageCounter(prompt_tokens=len(PROMPT))
        response = await responses.chat_response(stream, "m", usage, str, False)
        return response.choices[0].message.content, usage

    text, usage = asyncio.run(go())
    assert text == "Hello world!"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), len(TOKENS))


def test_held_back_text_is_sent_once_by_the_new_replica() -> None:
    # The first replica sent "He" but held "llo" back (a possible stop-string prefix) with token 102 sent.
    replicas = FakeReplicas(deliver=[2], hold_back_second=True)
    replicas_outputs, _ = collect(replicas)
    assert replicas.calls[1].resume == ResumeState(TOKENS[:2], len("He"))
    text = "".join(c.text for output in replicas_outputs for c in output.outputs)
    assert text == "".join(TEXTS)


def test_a_call_lost_after_its_final_output_ends_the_request_without_a_resume() -> None:
    # The replica died between sending the finish and ending the call: the client has everything (a resume would
    # ask the engine for tokens past max_tokens).
    replicas = FakeReplicas(deliver=[], die_after_last=True)
    outputs, reasons = collect(replicas)
    assert [token for output in outputs for c in output.outputs for token in c.token_ids] == TOKENS
    assert outputs[-1].finished and reasons == [] and len(replicas.calls) == 1


def test_max_migrations_bounds_the_calls_and_then_the_error_reaches_the_client() -> None:
    replicas = FakeReplicas(deliver=[1, 1, 1, 1])
    with pytest.raises(APIError) as raised:
        collect(replicas)
    assert raised.value.status_code == 503 and raised.value.code == "engine_unavailable"
    assert len(replicas.calls) == 1 + FAST.max_migrations
    assert [len(call.resume.output_token_ids) for call in replicas.calls[1:]] == [1, 2]


def test_the_migration_metric_counts_each_resume_and_the_give_up() -> None:
    reasons: list[str] = []

    async def go() -> None:
        stream = migrating_outputs("req", SamplingParams(max_tokens=6), FakeReplicas(deliver=[1, 1, 1]), FAST,
                                   reasons.append)  # fmt: skip
        async for _ in stream:
            pass

    with pytest.raises(APIError):
        asyncio.run(go())
    assert reasons == ["actor_died", "actor_died", "gave_up"]


def test_no_migration_with_max_migrations_zero() -> None:
    replicas = FakeReplicas(deliver=[1])
    with pytest.raises(APIError):
        collect(replicas, policy=MigrationPolicy(max_migrations=0, backoff_s=0.0))
    assert len(replicas.calls) == 1


def test_a_resumed_call_that_never_starts_ends_with_the_error_at_the_deadline() -> None:
    replicas = FakeReplicas(deliver=[2], hang=True)
    policy = MigrationPolicy(max_migrations=2, deadline_s=0.5, backoff_s=0.0)
    with pytest.raises(APIError) as raised:
        collect(replicas, policy=policy)
    assert raised.value.code == "engine_unavailable"
    assert len(replicas.calls) == 2


def test_a_new_request_that_no_replica_takes_ends_with_503_at_the_deadline() -> None:
    replicas = FakeReplicas(deliver=[], none_running=True)
    policy = MigrationPolicy(max_migrations=2, deadline_s=0.3, backoff_s=0.0)
    started = time.monotonic()
    with pytest.raises(APIError) as raised:
        collect(replicas, policy=policy)
    assert raised.value.status_code == 503 and raised.value.code == "engine_unavailable"
    assert time.monotonic() - started >= 0.3 and len(replicas.calls) == 1


def test_an_engine_failure_is_not_migrated() -> None:
    replicas = FakeReplicas(deliver=[1], error=ValueError("bad kernel input"))
    with pytest.raises(APIError) as raised:
        collect(replicas)
    assert raised.value.status_code == 500 and len(replicas.calls) == 1


def test_a_dead_engine_loop_is_migrated() -> None:
    replicas = FakeReplicas(deliver=[3], error=EngineUnavailableError("engine loop is not running"))
    outputs, reasons = collect(replicas)
    assert reasons == ["engine_dead"] and sum(len(o.outputs[0].token_ids) for o in outputs) == len(TOKENS)


def test_n_above_one_is_restarted_whole_before_any_token_was_sent() -> None:
    params = SamplingParams(n=2, max_tokens=6, temperature=1.0)
    restarted = FakeReplicas(deliver=[0])
    outputs, _ = collect(restarted, params)
    assert restarted.calls[1].resume is None and restarted.calls[1].params == params
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == len(TOKENS)


@dataclass
class FakeChoices:
    """An `n`-choice request: choice i's token at position p is `1000 * i + TOKENS[p]` (text TEXTS[p]), choice i
    ending after `lengths[i]` tokens. A whole call yields every unfinished choice per step; a resumed call
    (`n = 1`) continues choice `resume.sample_index`. Call k dies after `deliver[k]` outputs."""

    deliver: list[int]
    lengths: list[int]
    calls: list[Call] = field(default_factory=list)

    def __call__(self, request_id: str, params: SamplingParams, resume: ResumeState | None) -> AsyncIterator:
        self.calls.append(Call(request_id, params, resume))
        return self._outputs(len(self.calls) - 1, params, resume)

    async def _outputs(self, call: int, params: SamplingParams, resume: ResumeState | None) -> AsyncIterator:
        indexes = [resume.sample_index] if resume else list(range(params.n))
        start = len(resume.output_token_ids) if resume else 0
        for step, position in enumerate(range(start, max(self.lengths[i] for i in indexes))):
            if call < len(self.deliver) and step == self.deliver[call]:
                error = ActorDiedError()
                raise to_api_error(error) from error
            await asyncio.sleep(0)
            completions = [
                CompletionOutput(0 if resume else i, TEXTS[position], [1000 * i + TOKENS[position]],
                                 "length" if position == self.lengths[i] - 1 else None,
                                 cumulative_logprob=-1.0 * (position - start + 1))
                for i in indexes if position < self.lengths[i]
            ]  # fmt: skip
            done = all(position >= self.lengths[i] - 1 for i in indexes)
            yield RequestOutput("r", None, list(PROMPT), completions, done)

    def expected(self, index: int) -> list[int]:
        return [1000 * index + token for token in TOKENS[: self.lengths[index]]]


def _choices(outputs: list[RequestOutput], n: int) -> dict[int, tuple[list[int], str]]:
    tokens: dict[int, list[int]] = {i: [] for i in range(n)}
    texts = {i: "" for i in range(n)}
    for output in outputs:
        for completion in output.outputs:
            tokens[completion.index] += completion.token_ids
            texts[completion.index] += completion.text
    return {i: (tokens[i], texts[i]) for i in range(n)}


def test_n_above_one_cut_after_tokens_resumes_each_choice_from_its_own_tokens() -> None:
    replicas = FakeChoices(deliver=[2], lengths=[6, 4, 5])
    params = SamplingParams(n=3, max_tokens=6, temperature=0.8, seed=7)
    outputs, reasons = collect(replicas, params)  # type: ignore[arg-type]
    assert reasons == ["actor_died"]
    assert _choices(outputs, 3) == {i: (replicas.expected(i), "".join(TEXTS[: replicas.lengths[i]])) for i in range(3)}
    resumed = sorted(replicas.calls[1:], key=lambda call: call.resume.sample_index)
    assert [call.resume for call in resumed] == [ResumeState(replicas.expected(i)[:2], len("Hello"), i)
                                                 for i in range(3)]  # fmt: skip
    assert [call.request_id for call in resumed] == [f"req-c{i}-m1" for i in range(3)]
    # The same sampling params, one sample each: the engine resumes sample i's seeded stream (sample_index).
    assert all(call.params == params.model_copy(update={"n": 1}) for call in resumed)
    assert [output.finished for output in outputs] == [False] * (len(outputs) - 1) + [True]
    # One stream: the prompt once, each choice's cumulative logprob from its start.
    assert [bool(output.prompt_token_ids) for output in outputs].count(True) == 1
    last = {c.index: c.cumulative_logprob for output in outputs for c in output.outputs}
    assert last == {i: -1.0 * replicas.lengths[i] for i in range(3)}


def test_a_finished_choice_is_not_resumed_and_a_resumed_choice_may_migrate_again() -> None:
    # Choice 1 finished before the cut (2 tokens); choice 0's resumed call dies again after one more token.
    replicas = FakeChoices(deliver=[2, 1], lengths=[6, 2])
    outputs, reasons = collect(replicas, SamplingParams(n=2, max_tokens=6, temperature=0.0))  # type: ignore[arg-type]
    assert reasons == ["actor_died", "actor_died"]
    assert [call.request_id for call in replicas.calls] == ["req", "req-c0-m1", "req-c0-m2"]
    assert replicas.calls[2].resume == ResumeState(replicas.expected(0)[:3], len("Hello wo"), 0)
    assert _choices(outputs, 2) == {i: (replicas.expected(i), "".join(TEXTS[: replicas.lengths[i]])) for i in range(2)}


def test_a_resumed_choice_past_max_migrations_fails_the_request() -> None:
    replicas = FakeChoices(deliver=[1, 1, 1, 1], lengths=[6, 6])
    reasons: list[str] = []

    async def go() -> None:
        policy = MigrationPolicy(max_migrations=1, backoff_s=0.0)
        async for _ in migrating_outputs("req", SamplingParams(n=2, max_tokens=6), replicas, policy, reasons.append):
            pass

    with pytest.raises(APIError) as raised:
        asyncio.run(go())
    assert raised.value.code == "engine_unavailable"
    assert reasons.count("gave_up") == 1  # one request given up, however many of its choices were lost


def test_best_of_above_n_is_never_resumed_mid_output() -> None:
    from router.migration import Delivered

    delivered = Delivered()
    delivered.record(RequestOutput("r", None, PROMPT, [CompletionOutput(0, "He", [101])], False))
    assert delivered.resume(SamplingParams(n=1, best_of=2, temperature=1.0, max_tokens=6)) is None
    assert delivered.resume(SamplingParams(n=1, max_tokens=6))[0].resume == ResumeState([101], 2)


def test_errors_are_classified_by_their_cause() -> None:
    assert lost_replica_reason(to_api_error(ActorDiedError())) is None  # not raised from the cause: unknown
    error = ActorDiedError()
    try:
        raise to_api_error(error) from error
    except APIError as api_error:
        assert lost_replica_reason(api_error) == "actor_died"
    assert lost_replica_reason(EngineUnavailableError("gone")) == "engine_dead"
    assert lost_replica_reason(ValueError("other")) is None


@pytest.mark.parametrize(("error_status", "expected"), [(400, 400), (500, 500)])
def test_a_failed_output_is_answered_with_its_status_and_never_migrated(error_status: int, expected: int) -> None:
    # A grammar that reaches a dead state is the request's fault (400); any other engine failure is a 500.
    from router.streaming import replica_outputs

    failed = RequestOutput("r", None, list(PROMPT), [CompletionOutput(0, "", [], "abort")], True,
                           error="guided_regex: the grammar allows no next token (dead state)",
                           error_status=error_status)  # fmt: skip

    async def replica() -> AsyncIterator[RequestOutput]:
        yield failed

    async def go() -> None:
        async for _ in replica_outputs(replica()):  # type: ignore[arg-type]
            pass

    with pytest.raises(APIError) as raised:
        asyncio.run(go())
    assert raised.value.status_code == expected
    assert lost_replica_reason(raised.value) is None  # an answer, not a lost replica: not resumed elsewhere
