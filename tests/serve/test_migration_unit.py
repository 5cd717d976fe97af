"""Request migration's bookkeeping without Ray: what a resumed call is sent, what the client gets across the cut
(tokens, text, usage), and the bounds (max_migrations, the deadline, which errors and requests migrate)."""

from __future__ import annotations

import asyncio
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
    hold_back_second: bool = False  # the first call sends token 2 without its text (a possible stop-string prefix)
    calls: list[Call] = field(default_factory=list)

    def __call__(self, request_id: str, params: SamplingParams, resume: ResumeState | None) -> AsyncIterator:
        self.calls.append(Call(request_id, params, resume))
        return self._outputs(len(self.calls) - 1, resume)

    async def _outputs(self, call: int, resume: ResumeState | None) -> AsyncIterator[RequestOutput]:
        if self.hang and call > 0:
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


def test_an_engine_failure_is_not_migrated() -> None:
    replicas = FakeReplicas(deliver=[1], error=ValueError("bad kernel input"))
    with pytest.raises(APIError) as raised:
        collect(replicas)
    assert raised.value.status_code == 500 and len(replicas.calls) == 1


def test_a_dead_engine_loop_is_migrated() -> None:
    replicas = FakeReplicas(deliver=[3], error=EngineUnavailableError("engine loop is not running"))
    outputs, reasons = collect(replicas)
    assert reasons == ["engine_dead"] and sum(len(o.outputs[0].token_ids) for o in outputs) == len(TOKENS)


def test_n_above_one_is_restarted_only_before_any_token_was_sent() -> None:
    params = SamplingParams(n=2, max_tokens=6, temperature=1.0)
    restarted = FakeReplicas(deliver=[0])
    outputs, _ = collect(restarted, params)
    assert restarted.calls[1].resume is None and sum(len(o.outputs[0].token_ids) for o in outputs) == len(TOKENS)
    cut = FakeReplicas(deliver=[2])
    with pytest.raises(APIError):
        collect(cut, params)
    assert len(cut.calls) == 1


def test_errors_are_classified_by_their_cause() -> None:
    assert lost_replica_reason(to_api_error(ActorDiedError())) is None  # not raised from the cause: unknown
    error = ActorDiedError()
    try:
        raise to_api_error(error) from error
    except APIError as api_error:
        assert lost_replica_reason(api_error) == "actor_died"
    assert lost_replica_reason(EngineUnavailableError("gone")) == "engine_dead"
    assert lost_replica_reason(ValueError("other")) is None
