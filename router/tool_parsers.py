"""Tool calls in a model's text: the formats models write them in, and non-streaming extraction.

A format describes a *call region*: it opens at a marker (`<tool_call>`, `[TOOL_CALLS]`, `<|python_tag|>`) or, for
some formats, at a bare `{`/`[` that starts the output; inside it, call objects `{"name": ..., "arguments"|
"parameters": ...}` separated by whitespace, `,`, `;` or array brackets; it ends at a closing marker
(`</tool_call>`) or at the first character that is none of those. Text outside regions is content.

The rules both the whole-text `extract` here and the incremental parser (router/tool_stream.py) follow, so a
streamed answer accumulates to the same message as a whole one (tests/serve/test_tool_parsers.py checks it):
- a call's `arguments` is the model's own JSON text of the value (not re-serialized); a JSON string value (some
  models quote the object) is decoded; a call without arguments gets `{}`;
- whitespace touching a region is dropped; with calls, content that is empty is None;
- a region that ends with no call in it is kept as content; an object that is not a call (no string `name`, not
  JSON) ends parsing: the text from it (from the region's start if the region has no call yet) is content.
Malformed or cut-off output can differ: a streamed call is sent once its name is known and cannot be taken back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

ToolParserName = Literal["hermes", "llama3_json", "mistral"]

ARGUMENT_KEYS = ("arguments", "parameters")
FRAMING = "[],;"  # between call objects in a region, besides whitespace
JSON_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class CallFormat:
    name: str
    markers: tuple[str, ...] = ()  # open a region
    close: str | None = None  # closes a region (else it ends at the first character that is not a call or framing)
    bare_open: str = ""  # characters that open a region when they start the output (after whitespace)
    only_at_start: bool = False  # markers count only at the output's start
    # The markers are special tokens the detokenizer would drop: the request must keep them in the text.
    needs_special_tokens: bool = False


FORMATS: dict[str, CallFormat] = {
    # Qwen2.5 / Hermes 2 Pro: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one call per block.
    "hermes": CallFormat("hermes", markers=("<tool_call>",), close="</tool_call>"),
    # Llama 3.1+ JSON tool calling: the output is `{"name": ..., "parameters": {...}}` (calls joined by `;`),
    # optionally after `<|python_tag|>` (dropped from the text anyway with skip_special_tokens).
    "llama3_json": CallFormat("llama3_json", markers=("<|python_tag|>",), bare_open="{", only_at_start=True),
    # Mistral (tokenizer v3-v7): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; `[TOOL_CALLS]` is special.
    "mistral": CallFormat("mistral", markers=("[TOOL_CALLS]",), needs_special_tokens=True),
    # What `tool_choice: required` makes the model write under its grammar (router/tools.py).
    "json_array": CallFormat("json_array", bare_open="[", only_at_start=True),
}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ParsedMessage:
    content: str | None
    tool_calls: list[ParsedToolCall] = field(default_factory=list)


def arguments_text(raw_value: str) -> str:
    """A call's arguments from the JSON text of its value: a JSON string is decoded (some models quote the
    object), anything else is kept as the model wrote it."""
    return json.loads(raw_value) if raw_value.startswith('"') else raw_value


_DECODER = json.JSONDecoder()


def _skip_json_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in JSON_WHITESPACE:
        position += 1
    return position


def _call_members(text: str, start: int) -> tuple[str, str] | None:
    """(name, arguments) of the JSON object at `text[start]` (known to decode), from the first `name` and the
    first arguments key, or None when it is not a call."""
    name, arguments = None, None
    position = _skip_json_whitespace(text, start + 1)
    while text[position] != "}":
        key, position = _DECODER.raw_decode(text, position)
        position = _skip_json_whitespace(text, _skip_json_whitespace(text, position) + 1)  # past ':'
        value_start = position
        value, position = _DECODER.raw_decode(text, position)
        if key == "name" and name is None:
            if not isinstance(value, str):
                return None
            name = value
        elif key in ARGUMENT_KEYS and arguments is None:
            arguments = arguments_text(text[value_start:position])
        position = _skip_json_whitespace(text, position)
        if text[position] == ",":
            position = _skip_json_whitespace(text, position + 1)
    return None if name is None else (name, "{}" if arguments is None else arguments)


@dataclass
class _Region:
    calls: list[ParsedToolCall]
    end: int  # where content resumes
    outcome: Literal["closed", "ended", "malformed"]
    fallback: int  # on malformed: content restarts here


def _parse_region(text: str, position: int, fallback: int, fmt: CallFormat, make_id: Callable[[], str]) -> _Region:
    calls: list[ParsedToolCall] = []
    while position < len(text):
        char = text[position]
        if char.isspace() or char in FRAMING:
            position += 1
        elif char == "{":
            try:
                _, end = _DECODER.raw_decode(text, position)
            except ValueError:  # not JSON, or cut off
                return _Region(calls, position, "malformed", fallback)
            members = _call_members(text, position)
            if members is None:
                return _Region(calls, position, "malformed", fallback)
            calls.append(ParsedToolCall(make_id(), *members))
            position = fallback = end
        elif fmt.close is not None:
            if text.startswith(fmt.close, position):
                return _Region(calls, position + len(fmt.close), "closed", fallback)
            if fmt.close.startswith(text[position:]):  # a closing marker cut off by the end of the output
                return _Region(calls, len(text), "ended", fallback)
            return _Region(calls, position, "malformed", fallback)
        else:
            return _Region(calls, position, "ended", fallback)
    return _Region(calls, position, "ended", fallback)


def _find_marker(text: str, start: int, markers: tuple[str, ...]) -> tuple[int, str] | None:
    found = [(text.find(marker, start), marker) for marker in markers]
    found = [(index, marker) for index, marker in found if index >= 0]
    return min(found) if found else None


def extract(text: str, fmt: CallFormat, make_id: Callable[[], str] = new_call_id) -> ParsedMessage:
    """The content and tool calls of a whole output (see the module's rules)."""
    parts: list[str] = []
    calls: list[ParsedToolCall] = []
    position, after_region = 0, False
    anywhere_markers = () if fmt.only_at_start else fmt.markers
    start_region: int | None = None  # where the region at the output's start opens its body
    if fmt.only_at_start:
        first = len(text) - len(text.lstrip())
        marker = next((m for m in fmt.markers if text.startswith(m, first)), None)
        if marker is not None:
            start_region = first + len(marker)
        elif text[first : first + 1] and text[first] in fmt.bare_open:
            start_region = first
    while True:
        if after_region:
            position = len(text) - len(text[position:].lstrip())
        if start_region is not None:
            segment_end, body_start, start_region = 0, start_region, None
        else:
            found = _find_marker(text, position, anywhere_markers)
            if found is None:
                parts.append(text[position:])
                break
            segment_end, body_start = found[0], found[0] + len(found[1])
        segment = text[position:segment_end]
        parts.append(segment.rstrip())
        region_start = position + len(segment.rstrip())
        region = _parse_region(text, body_start, region_start, fmt, make_id)
        calls.extend(region.calls)
        if region.outcome == "malformed":
            parts.append(text[region.fallback :])
            break
        if not region.calls and region.outcome == "ended":
            parts.append(text[region_start : region.end])  # a region with no call is content
        position, after_region = region.end, True
    content = "".join(parts)
    return ParsedMessage(content if content or not calls else None, calls)
