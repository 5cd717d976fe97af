"""Tool calling on chat completions: what a request's `tools` and `tool_choice` ask of the prompt (tools in the chat
template), of sampling (a grammar for `required` and named choices) and of the answer (which text is a call).

- `none`: tools are neither rendered nor parsed: the answer is content. (vLLM renders them by default; leaving
  them out keeps a small model from writing calls that nobody would read.)
- `auto` (the default with tools): tools rendered, the output read by the model's parser (`tool_call_parser` of
  the ingress config); without one, a 400, since nothing could tell a call from content.
- `required`: a JSON schema forces `[{"name": <a tool>, "arguments": <its parameters>}, ...]` (one item with
  `parallel_tool_calls: false`), read back as calls; no parser needed.
- named function: a JSON schema forces that function's parameters; the whole output is its arguments.
NOTE: plain JSON schemas, not xgrammar structural tags: the output's shape is then the same for every model and
is read exactly, with or without a parser, and the engine's JSON-schema path (compile cache, errors naming the
field) is reused. The cost is that the model writes calls in this JSON, not in the format its template taught it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

from replicas.sampling_params import StructuredOutputParams
from router.errors import bad_request
from router.protocol import ChatCompletionRequest, ChatMessage
from router.structured_outputs import to_structured_output
from router.tool_parsers import FORMATS, CallFormat, ParsedMessage, ParsedToolCall, ToolParserName, extract, new_call_id
from router.tool_protocol import ChatTool, DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from router.tool_stream import StreamDelta, StreamingToolParser, ToolCallDelta

ToolMode = Literal["none", "auto", "required", "named"]
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """A chat request's tools, resolved: what to render, how to constrain sampling, how to read the output."""

    mode: ToolMode
    tools: list[ChatTool] = field(default_factory=list)
    named: str | None = None  # the function a named tool_choice forces
    call_format: CallFormat | None = None  # how the output is read (auto: the model's; required: the JSON array)
    structured_output: StructuredOutputParams | None = None
    parallel: bool = True  # False: at most one call per choice
    make_id: Callable[[], str] = new_call_id

    @property
    def reads_calls(self) -> bool:
        return self.mode != "none"

    @property
    def keeps_special_tokens(self) -> bool:
        return self.call_format is not None and self.call_format.needs_special_tokens

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as HF chat templates take them (`tools=`); none under `tool_choice: none`."""
        if self.mode == "none" or not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def extract(self, text: str) -> ParsedMessage:
        if self.mode == "named":
            return ParsedMessage(None, [ParsedToolCall(self.make_id(), self.named, text)])
        parsed = extract(text, self.call_format, self.make_id)
        if not self.parallel:
            parsed.tool_calls = parsed.tool_calls[:1]
        return parsed

    def stream(self) -> ToolStream:
        return ToolStream(self)


def plan_tools(request: ChatCompletionRequest, parser: ToolParserName | None) -> ToolPlan:
    """The request's `ToolPlan`; 400 naming the field for a tool_choice without tools or naming an unknown
    function, a bad parameter schema, a tool message answering no call, or `auto` with no parser configured."""
    _check_tool_messages(request.messages)
    tools = request.tools or []
    choice = request.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise bad_request("tool_choice needs tools: list the functions the model may call", "tool_choice")
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise bad_request(f"tools: function names must be unique (got {names})", "tools")
    for index, tool in enumerate(tools):
        _check_parameters(tool.function.parameters, f"tools.{index}.function.parameters")
    parallel = request.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan("none", tools, parallel=parallel)
    if choice == "auto":
        if parser is None:
            raise bad_request(
                "tool_choice 'auto' needs a tool call parser for this model (ingress config `tool_call_parser`), "
                "and none is configured: send tool_choice 'required' or a named function, which need none",
                "tool_choice", code="unsupported_field",
            )  # fmt: skip
        return ToolPlan("auto", tools, call_format=FORMATS[parser], parallel=parallel)
    if to_structured_output(request) is not None:
        raise bad_request("tool_choice 'required' or a named function constrains the output already: leave out "
                          "response_format and guided_* / structured_outputs", "tool_choice")  # fmt: skip
    if choice == "required":
        schema = _calls_schema(tools, parallel)
        spec = StructuredOutputParams(json_schema=schema, param="tools")
        return ToolPlan("required", tools, call_format=FORMATS["json_array"], structured_output=spec,
                        parallel=parallel)  # fmt: skip
    name = choice.function.name
    tool = next((tool for tool in tools if tool.function.name == name), None)
    if tool is None:
        raise bad_request(f"tool_choice names function {name!r}, which is not in tools ({names})",
                          "tool_choice.function.name")  # fmt: skip
    spec = StructuredOutputParams(json_schema=tool.function.parameters or EMPTY_PARAMETERS, param="tools")
    return ToolPlan("named", tools, named=name, structured_output=spec, parallel=False)


def _calls_schema(tools: list[ChatTool], parallel: bool) -> dict[str, Any]:
    """`tool_choice: required` as a JSON schema: an array of calls, each one of the tools with its parameters."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.function.name},
                           "arguments": tool.function.parameters or EMPTY_PARAMETERS},
            "required": ["name", "arguments"],
        }
        for tool in tools
    ]  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _check_parameters(parameters: dict[str, Any] | None, param: str) -> None:
    """A function's parameters are a JSON schema of an object (checked against the schema's metaschema)."""
    if parameters is None:
        return
    if parameters.get("type", "object") != "object":
        raise bad_request(f"{param}: a function's parameters are a JSON schema of type object", param)
    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError as error:
        raise bad_request(f"{param}: not a valid JSON schema: {error.message}", param) from None
    except Exception as error:  # noqa: BLE001 — a hostile schema (deep nesting, odd $refs) fails however it fails
        raise bad_request(f"{param}: not a usable JSON schema: {type(error).__name__}", param) from None


def _check_tool_messages(messages: list[ChatMessage]) -> None:
    """Each tool message answers a call of an earlier assistant message (as OpenAI requires)."""
    call_ids: set[str] = set()
    for index, message in enumerate(messages):
        for call in message.tool_calls or []:
            call_ids.add(call.id)
        if message.role == "tool" and message.tool_call_id not in call_ids:
            raise bad_request(
                f"messages.{index}.tool_call_id: {message.tool_call_id!r} answers no tool call of an earlier "
                "assistant message", f"messages.{index}.tool_call_id",
            )  # fmt: skip


def template_conversation(messages: list[ChatMessage], renders_tool_calls: bool) -> list[dict[str, Any]]:
    """Messages as chat templates read them: content as text, tool calls with their arguments as objects (what
    templates `tojson`). A template that shows no tool calls gets them in the assistant's content instead, as JSON,
    so the model still sees what it called."""
    conversation = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.tool_calls:
            calls = [{"name": call.function.name, "arguments": json.loads(call.function.arguments)}
                     for call in message.tool_calls]  # fmt: skip
            entry["tool_calls"] = [{"id": call.id, "type": "function", "function": rendered}
                                   for call, rendered in zip(message.tool_calls, calls)]  # fmt: skip
            if not renders_tool_calls:
                shown = "\n".join(json.dumps(call, ensure_ascii=False) for call in calls)
                entry["content"] = f"{entry['content']}\n{shown}" if entry["content"] else shown
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.name is not None and message.role == "tool":
            entry["name"] = message.name
        conversation.append(entry)
    return conversation


def with_tool_instructions(conversation: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a template that does not render tools: the tools' definitions in the system message, so the model
    knows what it may call (the grammar of `required`/named choices still fixes the shape)."""
    text = "You can call these functions; each is given as a JSON schema:\n" + "\n".join(
        json.dumps(tool["function"], ensure_ascii=False) for tool in tools
    )
    if conversation and conversation[0]["role"] == "system":
        first = dict(conversation[0], content=f"{conversation[0]['content']}\n\n{text}")
        return [first, *conversation[1:]]
    return [{"role": "system", "content": text}, *conversation]


def to_tool_calls(parsed: ParsedMessage) -> list[ToolCall] | None:
    calls = [ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
             for call in parsed.tool_calls]  # fmt: skip
    return calls or None


def finish_reason(engine_reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's `tool_calls` when the model stopped after writing calls; `length` (cut off) stays."""
    return "tool_calls" if has_calls and engine_reason == "stop" else engine_reason


class ToolStream:
    """One choice's streamed output turned into content and tool-call deltas."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.parser = None if plan.mode == "named" else StreamingToolParser(plan.call_format, plan.make_id)
        self.has_calls = False

    def feed(self, text: str, finished: bool) -> tuple[str | None, list[DeltaToolCall] | None]:
        """(content, tool-call deltas) for a piece of output; None where this piece has none."""
        if self.parser is None:
            delta = StreamDelta()
            if not self.has_calls:
                delta.add_call(ToolCallDelta(0, self.plan.make_id(), self.plan.named, ""))
            if text:
                delta.add_call(ToolCallDelta(0, arguments=text))
        else:
            delta = self.parser.feed(text)
            if finished:
                end = self.parser.finish()
                delta.content += end.content
                for call in end.tool_calls:
                    delta.add_call(call)
        calls = [call for call in delta.tool_calls if self.plan.parallel or call.index == 0]
        self.has_calls = self.has_calls or bool(calls)
        deltas = [DeltaToolCall(index=call.index, id=call.id, type="function" if call.id else None,
                                function=DeltaFunctionCall(name=call.name, arguments=call.arguments))
                  for call in calls]  # fmt: skip
        return delta.content or None, deltas or None
