"""Faults in the serving path: an engine step that raises fails only its requests; a killed replica is restarted by
Serve, the requests it held migrate to the other replica and complete as if nothing happened (router/migration.py),
a request that keeps losing its replica ends with a clear error after `max_migrations` (never a hang), and new
requests are served."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import ray

from tests.serve.conftest import ServedApp, run, wait_until
from tests.serve.fault_injection import (
    DYING_ONCE_PROMPT,
    DYING_PROMPT,
    INJECTED_FAULT_MESSAGE,
    POISON_PROMPT,
    dying_calls_in_process,
)
from tests.serve.stress_client import (
    CLIENT_TIMEOUT_S,
    Outcome,
    all_blocks_free,
    assert_openai_error,
    complete,
    live_replica_stats,
    random_ids,
    stream,
)


def test_an_exception_in_an_engine_step_fails_its_request_and_the_engine_goes_on(stress_app: ServedApp) -> None:
    wait_until(lambda: all_blocks_free(stress_app.name, 2), timeout_s=60)
    replicas_before = set(live_replica_stats(stress_app.name))

    async def scenario() -> tuple[Outcome, Outcome, list[Outcome]]:
        async with httpx.AsyncClient(base_url=stress_app.base_url) as client:
            poisoned = await complete(client, POISON_PROMPT + random_ids(8, 1), max_tokens=4)
            poisoned_stream = await stream(client, POISON_PROMPT + random_ids(8, 2), max_tokens=4)
            healthy = await asyncio.gather(*(complete(client, random_ids(12, seed), max_tokens=6) for seed in range(6)))
            return poisoned, poisoned_stream, healthy

    poisoned, poisoned_stream, healthy = run(scenario())
    # The failed request: an error that says what happened (an engine failure is the server's: 500), OpenAI-shaped.
    assert poisoned.status == 500, poisoned
    assert_openai_error(poisoned)
    assert poisoned.body["error"]["code"] == "engine_error"
    assert INJECTED_FAULT_MESSAGE in poisoned.body["error"]["message"]
    assert poisoned_stream.status == 500 and INJECTED_FAULT_MESSAGE in poisoned_stream.body["error"]["message"]
    # Everything else is served by the same replicas: the engine loop kept running, nothing was restarted.
    assert [outcome.status for outcome in healthy] == [200] * len(healthy)
    assert all(outcome.body["usage"]["completion_tokens"] == 6 for outcome in healthy)
    wait_until(lambda: all_blocks_free(stress_app.name, 2), timeout_s=60)
    assert set(live_replica_stats(stress_app.name)) == replicas_before


# The ingress's default: a request is resumed at most this many times (IngressConfig.max_migrations).
MAX_MIGRATIONS = 2
KILL_PROMPTS = [random_ids(10, 100 + i) for i in range(16)]
KILL_MAX_TOKENS = 500
# Two streams and two whole completions sample (seeded, with penalties): they must continue the same random stream.
SEEDED_SAMPLING = {"temperature": 0.8, "top_k": 40, "frequency_penalty": 0.5, "presence_penalty": 0.2}
SEEDED = {10, 11, 14, 15}


def kill_sampling(i: int) -> dict[str, Any]:
    return {**SEEDED_SAMPLING, "seed": 1000 + i} if i in SEEDED else {}


@dataclass
class Completion:
    """A greedy completion as its client saw it: the tokens (by id), text, usage blocks and any error."""

    status: int | str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    usages: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None


async def greedy_completion(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, streamed: bool,
                            sampling: dict[str, Any] | None = None) -> Completion:  # fmt: skip
    """Greedy unless `sampling` says otherwise."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True, "stream": streamed, **(sampling or {})}  # fmt: skip
    if not streamed:
        response = await client.post("/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)
        payload = response.json()
        if response.status_code != 200:
            return Completion(response.status_code, error=payload["error"])
        (choice,) = payload["choices"]
        return Completion(200, _token_ids(choice["logprobs"]["tokens"]), choice["text"], [payload["usage"]])
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", "/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S) as response:
        if response.status_code != 200:
            return Completion(response.status_code, error=json.loads(await response.aread())["error"])
        completion = Completion(200)
        async for line in response.aiter_lines():
            data = line.removeprefix("data: ")
            if not line.startswith("data: ") or data == "[DONE]":
                continue
            event = json.loads(data)
            if "error" in event:
                completion.error = event["error"]
                continue
            if event.get("usage"):
                completion.usages.append(event["usage"])
            for choice in event["choices"]:
                completion.text += choice["text"]
                completion.token_ids += _token_ids(choice["logprobs"]["tokens"])
        return completion


def _token_ids(tokens: list[str]) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in tokens]


def dying_calls(app_name: str) -> int:
    """Calls for `DYING_PROMPT` requests over the app's replicas (tests/serve/fault_injection.py)."""
    names = list(live_replica_stats(app_name))
    actors = [ray.get_actor(name, namespace="serve") for name in names]
    return sum(ray.get([actor.__ray_call__.remote(dying_calls_in_process) for actor in actors], timeout=30))


@pytest.mark.parametrize("streamed", [True, False])
def test_a_request_that_keeps_losing_its_replica_ends_with_the_error_after_max_migrations(
    stress_app: ServedApp, streamed: bool
) -> None:
    wait_until(lambda: all_blocks_free(stress_app.name, 2), timeout_s=60)
    calls_before = dying_calls(stress_app.name)

    async def scenario() -> Completion:
        async with httpx.AsyncClient(base_url=stress_app.base_url) as client:
            return await greedy_completion(client, DYING_PROMPT + random_ids(6, 5), 200, streamed)

    outcome = run(scenario())
    # Each call delivers a little and then its engine "dies": resumed twice, then the client gets today's error.
    assert dying_calls(stress_app.name) - calls_before == 1 + MAX_MIGRATIONS
    assert outcome.error is not None and outcome.error["code"] == "engine_unavailable", outcome
    if streamed:
        assert outcome.status == 200 and not outcome.usages  # an SSE error event after the tokens it did get
        assert 1 + MAX_MIGRATIONS <= len(outcome.token_ids) < 200
    else:
        assert outcome.status == 503
    wait_until(lambda: all_blocks_free(stress_app.name, 2), timeout_s=60)


def test_requests_on_a_killed_replica_migrate_and_complete_as_if_uninterrupted(stress_app: ServedApp) -> None:
    _kill_a_replica_under_load(stress_app, _uninterrupted(stress_app))


@pytest.mark.slow
def test_three_kills_in_a_row_are_survived(stress_app: ServedApp) -> None:
    references = _uninterrupted(stress_app)
    for _ in range(3):
        _kill_a_replica_under_load(stress_app, references)


def _uninterrupted(stress_app: ServedApp) -> list[Completion]:
    async def scenario() -> list[Completion]:
        async with httpx.AsyncClient(base_url=stress_app.base_url,
                                     limits=httpx.Limits(max_connections=None)) as client:  # fmt: skip
            return await asyncio.gather(*(greedy_completion(client, prompt, KILL_MAX_TOKENS, False, kill_sampling(i))
                                          for i, prompt in enumerate(KILL_PROMPTS)))  # fmt: skip

    references = run(scenario())
    assert [reference.status for reference in references] == [200] * len(KILL_PROMPTS)
    return references


def _kill_a_replica_under_load(stress_app: ServedApp, references: list[Completion]) -> None:
    app_name = stress_app.name
    wait_until(lambda: all_blocks_free(app_name, 2), timeout_s=60)
    names_before = set(live_replica_stats(app_name))

    def busy_replicas() -> list[str]:
        return sorted(name for name, s in live_replica_stats(app_name).items() if s["num_running"] > 0)

    async def scenario() -> tuple[str, list[Completion]]:
        async with httpx.AsyncClient(base_url=stress_app.base_url,
                                     limits=httpx.Limits(max_connections=None)) as client:  # fmt: skip
            # 12 streams and 4 whole completions; then a replica dies under some of them.
            requests = [asyncio.create_task(greedy_completion(client, prompt, KILL_MAX_TOKENS, i < 12,
                                                              kill_sampling(i)))
                        for i, prompt in enumerate(KILL_PROMPTS)]  # fmt: skip
            # NOTE: the victim is a replica holding requests, whichever the router chose (not necessarily both).
            victim = (await asyncio.to_thread(wait_until, busy_replicas, 60, 0.2))[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            return victim, await asyncio.gather(*requests)

    victim, outcomes = run(scenario())
    # Every request completes, token for token what it would have been without the kill (greedy, and seeded
    # sampling with penalties alike), one usage block each.
    for i, (outcome, reference) in enumerate(zip(outcomes, references)):
        assert outcome.status == 200 and outcome.error is None, (i, outcome.status, outcome.error)
        assert len(outcome.token_ids) == KILL_MAX_TOKENS, i
        assert outcome.token_ids == reference.token_ids, i
        assert outcome.text == reference.text, i
        assert len(outcome.usages) == 1, (i, outcome.usages)
        usage = outcome.usages[0]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (10, KILL_MAX_TOKENS), (i, usage)

    # New requests are served (by the survivor at once, and by the replacement once it is up).
    async def served() -> bool:
        async with httpx.AsyncClient(base_url=stress_app.base_url) as client:
            outcomes = await asyncio.gather(*(complete(client, random_ids(8, seed), max_tokens=4) for seed in range(4)))
        return all(outcome.status == 200 for outcome in outcomes)

    wait_until(lambda: run(served()), timeout_s=60, interval_s=1)
    # Serve replaces the dead replica; every block is free again on both.
    wait_until(lambda: victim not in live_replica_stats(app_name) and all_blocks_free(app_name, 2), timeout_s=180,
               interval_s=1)  # fmt: skip
    assert len(set(live_replica_stats(app_name)) - names_before) == 1
    assert run(served())


async def _choices(client: httpx.AsyncClient, prompt: list[int], streamed: bool, n: int,
                   sampling: dict[str, Any]) -> dict[int, list[int]]:  # fmt: skip
    """Each choice's token ids of an `n`-choice completion (streamed or not); fails on any error."""
    body = {"prompt": prompt, "max_tokens": 64, "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True,
            "n": n, "stream": streamed, **sampling}  # fmt: skip
    tokens: dict[int, list[int]] = {i: [] for i in range(n)}
    if not streamed:
        response = await client.post("/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)
        assert response.status_code == 200, response.text
        for choice in response.json()["choices"]:
            tokens[choice["index"]] = _token_ids(choice["logprobs"]["tokens"])
        return tokens
    async with client.stream("POST", "/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            data = line.removeprefix("data: ")
            if line.startswith("data: ") and data != "[DONE]":
                event = json.loads(data)
                assert "error" not in event, event
                for choice in event["choices"]:
                    tokens[choice["index"]] += _token_ids(choice["logprobs"]["tokens"])
    return tokens


@pytest.mark.parametrize("streamed", [True, False])
def test_an_n_request_cut_after_tokens_resumes_each_choice_as_uninterrupted(stress_app: ServedApp,
                                                                             streamed: bool) -> None:  # fmt: skip
    # DYING_ONCE_PROMPT: the first call of each request dies after some tokens; its resumed calls live. A one-choice
    # request is resumed exactly (the kill tests above), so it is the reference for every greedy choice and for
    # choice 0 of a seeded request (sample 0's stream).
    wait_until(lambda: all_blocks_free(stress_app.name, 2), timeout_s=60)
    prompt = DYING_ONCE_PROMPT + random_ids(6, 900 + streamed)
    seeded = {"temperature": 0.9, "top_k": 40, "seed": 4242}

    async def scenario() -> tuple[dict[int, list[int]], ...]:
        async with httpx.AsyncClient(base_url=stress_app.base_url) as client:
            greedy_one = await _choices(client, prompt, streamed, 1, {"temperature": 0})
            greedy_three = await _choices(client, prompt, streamed, 3, {"temperature": 0})
            seeded_one = await _choices(client, prompt, streamed, 1, seeded)
            seeded_two = await _choices(client, prompt, streamed, 2, seeded)
            seeded_two_again = await _choices(client, prompt, streamed, 2, seeded)
            return greedy_one, greedy_three, seeded_one, seeded_two, seeded_two_again

    greedy_one, greedy_three, seeded_one, seeded_two, seeded_two_again = run(scenario())
    assert len(greedy_one[0]) == 64
    assert greedy_three == {i: greedy_one[0] for i in range(3)}
    assert seeded_two[0] == seeded_one[0] and len(seeded_two[1]) == 64
    assert seeded_two == seeded_two_again  # choice 1 too continues its own seeded stream
    wait_until(lambda: all_blocks_free(stress_app.name, 2), timeout_s=60)
