"""Tool calling through the served default model (SmolLM2, no tool call parser, a template that shows no tools)
with the OpenAI SDK: `tool_choice="required"` and a named function are grammar-constrained, so every call's
arguments validate against its function's schema, streamed or not; a conversation with tool results is accepted."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.serve.conftest import ServedApp

GREEDY = {"temperature": 0.0}
CITIES = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Mumbai", "Berlin", "Madrid",
          "Seoul", "Lagos", "Denver", "Hanoi", "Dublin", "Quito", "Perth", "Prague", "Havana"]  # fmt: skip
# Bounded strings: an unbounded one lets a small model ramble until max_tokens (as in test_structured_outputs.py).
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 32}, "hour24": {"type": "boolean"}},
    "required": ["timezone", "hour24"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The local time in a time zone",
                                      "parameters": TIME_PARAMETERS}},
]  # fmt: skip
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def client(default_app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=default_app.v1, api_key=default_app.api_key, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def model(default_app: ServedApp) -> str:
    return default_app.model_id


def _ask(city: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather like in {city} right now?"}]


def _assert_valid_calls(message: object, finish_reason: str, named: str | None = None, most: int = 1) -> None:
    assert finish_reason == "tool_calls"
    calls = message.tool_calls
    assert 1 <= len(calls) <= most, calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert named is None or call.function.name == named
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _stream(client: openai.OpenAI, **request: object) -> tuple[object, str]:
    """A streamed chat completion accumulated by the SDK's own helper (it merges tool-call deltas by index)."""
    with client.chat.completions.stream(**request) as stream:
        for _ in stream:
            pass
        completion = stream.get_final_completion()
    return completion.choices[0].message, completion.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_gives_a_call_valid_against_its_function_for_every_prompt(
    client: openai.OpenAI, model: str, stream: bool
) -> None:
    def ask(city: str) -> tuple[object, str]:
        request = {"model": model, "messages": _ask(city), "tools": TOOLS, "tool_choice": "required",
                   "parallel_tool_calls": False, "max_tokens": 96, **GREEDY}  # fmt: skip
        if stream:
            return _stream(client, **request)
        choice = client.chat.completions.create(**request).choices[0]
        return choice.message, choice.finish_reason

    with ThreadPoolExecutor(len(CITIES)) as pool:  # concurrent: the constrained rows decode in one batch
        answers = list(pool.map(ask, CITIES))
    for message, finish_reason in answers:
        assert message.content is None
        _assert_valid_calls(message, finish_reason)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_named_function_is_the_one_called_for_every_prompt(client: openai.OpenAI, model: str, stream: bool) -> None:
    def ask(city: str) -> tuple[object, str]:
        request = {"model": model, "messages": _ask(city), "tools": TOOLS, "tool_choice": NAMED_TIME,
                   "max_tokens": 96, **GREEDY}  # fmt: skip
        if stream:
            return _stream(client, **request)
        choice = client.chat.completions.create(**request).choices[0]
        return choice.message, choice.finish_reason

    with ThreadPoolExecutor(len(CITIES)) as pool:
        answers = list(pool.map(ask, CITIES))
    for message, finish_reason in answers:
        _assert_valid_calls(message, finish_reason, named="get_time")


def test_streamed_calls_equal_whole_ones(client: openai.OpenAI, model: str) -> None:
    request = {"model": model, "messages": _ask("Paris"), "tools": TOOLS, "tool_choice": "required",
               "max_tokens": 160, **GREEDY}  # fmt: skip
    whole = client.chat.completions.create(**request).choices[0]
    streamed, finish_reason = _stream(client, **request)
    assert finish_reason == whole.finish_reason
    assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


def test_raw_stream_sends_name_first_then_argument_pieces(client: openai.OpenAI, model: str) -> None:
    chunks = client.chat.completions.create(model=model, messages=_ask("Oslo"), tools=TOOLS, tool_choice=NAMED_TIME,
                                            max_tokens=96, stream=True, **GREEDY)  # fmt: skip
    deltas = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.type, first.function.name) == (0, "function", "get_time") and first.id
    assert rest and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = first.function.arguments + "".join(d.function.arguments for d in rest)
    jsonschema.validate(json.loads(arguments), TIME_PARAMETERS)


def test_tool_results_round_trip_into_an_answer(client: openai.OpenAI, model: str) -> None:
    """Call, run the tool, send its result back as a `tool` message: the model answers in content."""
    messages = _ask("Lima")
    first = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=96, **GREEDY)  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))  # content None, tool_calls
    result = json.dumps({"temperature": 19, "sky": "clear"})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=24, **GREEDY)  # fmt: skip
    choice = answer.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_parallel_calls_are_indexed_in_order(client: openai.OpenAI, model: str) -> None:
    """`required` with parallel calls allowed: however many calls the model writes, each is valid and indexed."""
    messages = [{"role": "user", "content": "What is the weather in Paris and in Tokyo, and the time in Tokyo?"}]
    message, finish_reason = _stream(client, model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                     max_tokens=256, **GREEDY)  # fmt: skip
    if finish_reason == "length":  # the model may keep adding calls: cut off, the last one is partial
        message.tool_calls = message.tool_calls[:-1]
        finish_reason = "tool_calls"
    _assert_valid_calls(message, finish_reason, most=len(message.tool_calls))
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)
