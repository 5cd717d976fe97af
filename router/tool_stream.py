"""Tool calls parsed from streamed text: fed arbitrary chunks, emits content deltas and tool-call deltas the way
OpenAI streams them (the first delta of a call: index, id, name and the arguments so far; then argument pieces).

The rules are router/tool_parsers.py's; this is their incremental form, a character scanner. Text that could still
turn out to be a marker, or whitespace that could touch a region, is held back until the next chunk (or `finish`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from router.tool_parsers import ARGUMENT_KEYS, FRAMING, JSON_WHITESPACE, CallFormat, arguments_text, new_call_id


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # with the name, in a call's first delta only
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call(self, delta: ToolCallDelta) -> None:
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == delta.index and delta.id is None:
            last.arguments += delta.arguments  # one delta per call per chunk
        else:
            self.tool_calls.append(delta)


class _CallObject:
    """One call object being scanned: the JSON text so far, where its members' keys and values are, and how much
    of the arguments has been sent."""

    def __init__(self) -> None:
        self.raw = ""
        self.depth = 0
        self.in_string = self.escaped = False
        self.expecting: Literal["key", "value"] = "key"
        self.key_start = self.value_start = -1
        self.key: str | None = None
        self.name: str | None = None
        self.bad_name = False
        self.arguments_start = -1  # where the first arguments value starts in `raw`
        self.arguments_end = -1  # where it ends (exclusive), once it has
        self.index: int | None = None  # the call's index once its first delta is sent
        self.sent = 0  # characters of the arguments sent

    def feed(self, char: str) -> bool:
        """Scan one character; True when it closed the object."""
        position = len(self.raw)
        self.raw += char
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                if self.depth == 1 and self.expecting == "key":
                    self.key = _json_string(self.raw[self.key_start :])
            return False
        if char == '"':
            self.in_string = True
            if self.depth == 1 and self.expecting == "key":
                self.key_start = position
        if self.depth == 1 and self.expecting == "value" and self.value_start < 0 and char not in JSON_WHITESPACE:
            self.value_start = position
            if self.key in ARGUMENT_KEYS and self.arguments_start < 0:
                self.arguments_start = position
        if char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            if self.depth == 0:
                self._end_value(position)
                return True
        elif char == ":" and self.depth == 1:
            self.expecting, self.value_start = "value", -1
        elif char == "," and self.depth == 1:
            self._end_value(position)
            self.expecting = "key"
        return False

    def _end_value(self, position: int) -> None:
        if self.expecting != "value" or self.value_start < 0:
            return
        value = self.raw[self.value_start : position].rstrip(JSON_WHITESPACE)
        if self.key == "name" and self.name is None and not self.bad_name:
            parsed = _json_string(value)
            self.name, self.bad_name = (parsed, False) if parsed is not None else (None, True)
        if self.value_start == self.arguments_start:
            self.arguments_end = self.value_start + len(value)

    def arguments_ready(self, closed: bool) -> str:
        """The arguments text that can be sent now: a JSON string value only whole (it is decoded), other values as
        they come, without trailing whitespace (it may still turn out to end the value)."""
        if self.arguments_start < 0:
            return "{}" if closed else ""
        if self.arguments_end >= 0:
            value = self.raw[self.arguments_start : self.arguments_end]
            try:
                return arguments_text(value)
            except ValueError:  # a malformed JSON string: sent as written (the call was announced already)
                return value
        if self.raw[self.arguments_start] == '"':
            return ""
        return self.raw[self.arguments_start :].rstrip(JSON_WHITESPACE)


class StreamingToolParser:
    """`feed(text) -> StreamDelta` per chunk, then `finish() -> StreamDelta` once the output ends."""

    def __init__(self, fmt: CallFormat, make_id: Callable[[], str] = new_call_id) -> None:
        self.fmt = fmt
        self.make_id = make_id
        self.mode: Literal["start", "content", "region", "passthrough"] = "start"
        if not (fmt.only_at_start and (fmt.markers or fmt.bare_open)):
            self.mode = "content"
        self.markers = () if fmt.only_at_start else fmt.markers
        self.held = ""  # content not yet emitted: trailing whitespace, then maybe the start of a marker
        self.after_region = False  # drop whitespace right after a region
        self.fallback = ""  # region text that becomes content if the region turns out to be none
        self.region_calls = 0
        self.closing = ""  # the part of the closing marker matched so far
        self.call: _CallObject | None = None
        self.num_calls = 0

    def feed(self, text: str) -> StreamDelta:
        delta = StreamDelta()
        pending = text
        while pending:
            if self.mode == "passthrough":
                delta.content += pending
                break
            if self.mode == "region":
                pending = self._region(pending, delta)
            elif self.mode == "start":
                pending = self._start(pending)
            else:
                pending = self._content(pending, delta)
        if self.call is not None:
            self._send_arguments(self.call, delta, closed=False)
        return delta

    def finish(self) -> StreamDelta:
        delta = StreamDelta()
        if self.mode == "region":
            if self.call is not None and self.call.index is None:  # cut off before its name: not a call
                delta.content += self.fallback + self.call.raw
            elif self.call is None and not self.region_calls:  # a region with no call is content
                delta.content += self.fallback + self.closing
        elif self.mode in ("content", "start"):
            delta.content += self.held
        self.held, self.fallback, self.call, self.mode = "", "", None, "passthrough"
        return delta

    # --- modes ------------------------------------------------------------------------------------------------

    def _start(self, text: str) -> str:
        """Before the output's first non-whitespace character: does a region open here?"""
        buffer, self.held = self.held + text, ""
        stripped = buffer.lstrip()
        if not stripped:
            self.held = buffer
            return ""
        whitespace = buffer[: len(buffer) - len(stripped)]
        marker = next((m for m in self.fmt.markers if stripped.startswith(m)), None)
        if marker is not None:
            self._open_region(whitespace + marker)
            return stripped[len(marker) :]
        if any(m.startswith(stripped) for m in self.fmt.markers):
            self.held = buffer
            return ""
        if stripped[0] in self.fmt.bare_open:
            self._open_region(whitespace)
            return stripped
        self.mode = "content" if self.markers else "passthrough"
        return buffer

    def _content(self, text: str, delta: StreamDelta) -> str:
        buffer = self.held + text
        if self.after_region:
            buffer = buffer.lstrip()
            self.after_region = not buffer
        found = [(buffer.find(m), m) for m in self.markers if m in buffer]
        if found:
            index, marker = min(found)
            before = buffer[:index]
            delta.content += before.rstrip()
            self.held = ""
            self._open_region(before[len(before.rstrip()) :] + marker)
            return buffer[index + len(marker) :]
        keep = _marker_prefix_length(buffer, self.markers)
        body = buffer[: len(buffer) - keep]
        keep += len(body) - len(body.rstrip())  # whitespace that may touch a region
        delta.content += buffer[: len(buffer) - keep]
        self.held = buffer[len(buffer) - keep :]
        return ""

    def _open_region(self, fallback: str) -> None:
        self.mode, self.fallback, self.region_calls, self.closing = "region", fallback, 0, ""

    def _region(self, text: str, delta: StreamDelta) -> str:
        for position, char in enumerate(text):
            if self.call is not None:
                if self.call.feed(char):
                    if not self._end_call(delta):
                        return self._malformed(text[position + 1 :], delta)
                elif self.call.name is not None and self.call.index is None:
                    self._start_call(self.call, delta)
                elif self.call.bad_name:
                    return self._malformed(text[position + 1 :], delta)
                continue
            close = self.fmt.close
            if self.closing or (close is not None and char == close[0]):
                self.closing += char
                if self.closing == close:  # a closed region without calls is dropped, as extract does
                    self.fallback, self.closing, self.mode, self.after_region = "", "", "content", True
                    return text[position + 1 :]
                if close.startswith(self.closing):
                    continue
                self.fallback += self.closing
                self.closing = ""
                return self._malformed(text[position + 1 :], delta)
            if char.isspace() or char in FRAMING:
                self.fallback += char
            elif char == "{":
                self.call = _CallObject()
                self.call.feed(char)
            elif close is not None:
                self.fallback += char
                return self._malformed(text[position + 1 :], delta)
            else:  # the region ends; a region without calls is content
                if not self.region_calls:
                    delta.content += self.fallback
                self.fallback, self.mode, self.after_region = "", "content", True
                return text[position:]
        return ""

    def _start_call(self, call: _CallObject, delta: StreamDelta) -> None:
        call.index = self.num_calls
        self.num_calls += 1
        self.region_calls += 1
        self.fallback = ""
        delta.add_call(ToolCallDelta(call.index, self.make_id(), call.name, ""))
        self._send_arguments(call, delta, closed=False)

    def _send_arguments(self, call: _CallObject, delta: StreamDelta, closed: bool) -> None:
        if call.index is None:
            return
        ready = call.arguments_ready(closed)
        if len(ready) > call.sent:
            delta.add_call(ToolCallDelta(call.index, arguments=ready[call.sent :]))
            call.sent = len(ready)

    def _end_call(self, delta: StreamDelta) -> bool:
        """The call object closed: send the rest of it. False when it was not a call."""
        call, self.call = self.call, None
        if call.name is None:
            self.fallback += call.raw
            return False
        if call.index is None:
            self._start_call(call, delta)
        self._send_arguments(call, delta, closed=True)
        self.fallback = ""
        return True

    def _malformed(self, rest: str, delta: StreamDelta) -> str:
        """Not a call: what the region held since its last call, and everything after, is content."""
        if self.call is not None:
            self.fallback += self.call.raw
            self.call = None
        delta.content += self.fallback + rest
        self.fallback, self.mode = "", "passthrough"
        return ""


def _json_string(text: str) -> str | None:
    """`text` as a JSON string, or None when it is not one (the scanner does not validate escapes)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _marker_prefix_length(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that a marker starts with (it may be completed by the next chunk)."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:length]):
                longest = length
                break
    return longest
