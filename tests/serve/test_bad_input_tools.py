"""Bad tool-calling input: each case a 400 in OpenAI's shape naming the field and the problem (the tiny app has no
tool call parser, so `auto` is among them)."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import ServedApp
from tests.serve.test_bad_requests import post_and_expect_error

ASK = {"role": "user", "content": "Weather in Paris?"}
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CALLED = {"role": "assistant", "content": None, "tool_calls": [CALL]}


def _chat(**fields: object) -> dict:
    return {"messages": [ASK], "tools": [TOOL], "tool_choice": "required", "max_tokens": 8, **fields}


def _tool(parameters: object) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


def _with_call(**function: object) -> dict:
    """A conversation whose assistant message has one call to `function` (name, arguments)."""
    return _chat(messages=[ASK, {"role": "assistant", "tool_calls": [{**CALL, "function": function}]}])


def _object_with(property_schema: dict) -> list[dict]:
    return [_tool({"type": "object", "properties": {"a": property_schema}})]


# (name, body, param, text the message must contain)
BAD_TOOL_REQUESTS = [
    ("auto with no parser configured", _chat(tool_choice="auto"), "tool_choice", "tool_call_parser"),
    ("tools alone mean auto", {"messages": [ASK], "tools": [TOOL]}, "tool_choice", "tool_call_parser"),
    ("named function not in tools", _chat(tool_choice={"type": "function", "function": {"name": "get_time"}}),
     "tool_choice.function.name", "'get_time', which is not in tools"),
    ("required without tools", {"messages": [ASK], "tool_choice": "required"}, "tool_choice", "needs tools"),
    ("unknown tool_choice string", _chat(tool_choice="always"), "tool_choice", ""),
    ("tool type not function", _chat(tools=[{"type": "retrieval", "function": TOOL["function"]}]), "tools.0.type",
     ""),
    ("function name with spaces", _chat(tools=[{"type": "function", "function": {"name": "get weather"}}]),
     "tools.0.function.name", "pattern"),
    ("two functions of one name", _chat(tools=[TOOL, TOOL]), "tools", "unique"),
    ("parameters not an object schema", _chat(tools=[_tool({"type": "string"})]), "tools.0.function.parameters",
     "type object"),
    ("parameters not a valid JSON schema", _chat(tools=_object_with({"type": "strin"})),
     "tools.0.function.parameters", "not a valid JSON schema"),
    ("parameters the grammar cannot compile", _chat(tools=_object_with({"$ref": "#/nowhere"})), "tools",
     "does not compile"),
    ("required with a response_format too", _chat(response_format={"type": "json_object"}), "tool_choice",
     "constrains the output already"),
    ("tool message without tool_call_id", _chat(messages=[ASK, CALLED, {"role": "tool", "content": "sunny"}]),
     "messages.2.tool_call_id", "needs tool_call_id"),
    ("tool message answering no call",
     _chat(messages=[ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]), "messages.1.tool_call_id",
     "answers no tool call"),
    ("tool_call_id on a user message", _chat(messages=[{**ASK, "tool_call_id": "call_1"}]),
     "messages.0.tool_call_id", "only tool messages"),
    ("tool_calls on a user message", _chat(messages=[{**ASK, "tool_calls": [CALL]}]), "messages.0.tool_calls",
     "only assistant messages"),
    ("tool call without its function", _chat(messages=[ASK, {"role": "assistant", "tool_calls": [{"id": "c"}]}]),
     "messages.1.tool_calls.0.function", ""),
    ("arguments as an object, not a string", _with_call(name="f", arguments={}),
     "messages.1.tool_calls.0.function.arguments", "valid string"),
    ("arguments not JSON", _with_call(name="f", arguments="{x"), "messages.1.tool_calls.0.function.arguments",
     "JSON object encoded as a string"),
    ("arguments JSON but not an object", _with_call(name="f", arguments="[1]"),
     "messages.1.tool_calls.0.function.arguments", "JSON object encoded as a string"),
    ("deprecated functions", {"messages": [ASK], "functions": [TOOL["function"]]}, "functions", "as `tools`"),
    ("deprecated function_call", {"messages": [ASK], "function_call": {"name": "f"}}, "function_call", "tool_choice"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param", "message"), [case[1:] for case in BAD_TOOL_REQUESTS],
                         ids=[case[0] for case in BAD_TOOL_REQUESTS])  # fmt: skip
def test_bad_tool_input_is_a_400_naming_the_field(tiny_app: ServedApp, body: dict, param: str, message: str) -> None:
    post_and_expect_error(tiny_app, "/v1/chat/completions", body, None, 400, param, message)


def test_tool_choice_none_with_tools_needs_no_parser(tiny_app: ServedApp) -> None:
    body = {"messages": [ASK, CALLED, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
            "tools": [TOOL], "tool_choice": "none", "parallel_tool_calls": False, "max_tokens": 4}  # fmt: skip
    response = httpx.post(f"{tiny_app.v1}/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["tool_calls"] is None and choice["finish_reason"] in ("stop", "length")
