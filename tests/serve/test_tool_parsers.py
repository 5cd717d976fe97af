"""Tool-call parsers on recorded model outputs: what the whole-text extraction finds, and that the streaming parser,
fed the same text in arbitrary chunks, accumulates (as the OpenAI SDK does) to exactly the same message."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.tool_parsers import FORMATS, ParsedMessage, ParsedToolCall, extract
from router.tool_stream import StreamDelta, StreamingToolParser

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'

# (format, recorded output, expected content, expected [(name, arguments as an object)])
RECORDED = [
    # Qwen2.5-Instruct (hermes)
    ("hermes", '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", '
     '"unit": "celsius"}}\n</tool_call>', None,
     [("get_current_temperature", {"location": "San Francisco, CA, USA", "unit": "celsius"})]),
    ("hermes", f"I'll check both cities.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n"
     '{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>', "I'll check both cities.",
     [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_weather", {"city": "Tokyo"})]),
    ("hermes", "The capital of France is Paris. A < B, and <tool_ is not a tag.\n",
     "The capital of France is Paris. A < B, and <tool_ is not a tag.\n", []),
    ("hermes", '<tool_call>\n{"arguments": {"text": "say \\"hi\\" {not a brace} – naïve \\\\n", "opts": {"x": '
     '[1, {"y": null}]}}, "name": "send"}\n</tool_call>', None,
     [("send", {"text": 'say "hi" {not a brace} – naïve \\n', "opts": {"x": [1, {"y": None}]}})]),
    ("hermes", '<tool_call>{"name": "ping", "arguments": "{\\"host\\": \\"a\\"}"}</tool_call>', None,
     [("ping", {"host": "a"})]),  # arguments quoted as a JSON string: decoded
    ("hermes", '<tool_call>{"name": "now"}</tool_call> Done.', "Done.", [("now", {})]),
    ("hermes", '<tool_call>\nget_weather(city="Paris")\n</tool_call>',
     '<tool_call>\nget_weather(city="Paris")\n</tool_call>', []),  # not JSON: content
    ("hermes", '<tool_call>\n{"function": "f"}\n</tool_call>', '<tool_call>\n{"function": "f"}\n</tool_call>', []),
    # Llama 3.1/3.2 JSON tool calling
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]),
    ("llama3_json", "It is sunny in Paris {today}.", "It is sunny in Paris {today}.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # JSON but no call: content
    # Mistral (v3 tokenizer, special tokens kept)
    ("mistral", f'[TOOL_CALLS][{WEATHER}, {{"name": "get_time", "arguments": {{}}}}]', None,
     [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {})]),
    ("mistral", 'Let me search. [TOOL_CALLS] [{"name": "search", "arguments": {"q": "[TOOL_CALLS] ]} in a string"}}]',
     "Let me search.", [("search", {"q": "[TOOL_CALLS] ]} in a string"})]),
    ("mistral", "Paris [is] the capital [TOOL_", "Paris [is] the capital [TOOL_", []),
    # What tool_choice=required makes any model write (router/tools.py)
    ("json_array", '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": [2, "]"]}}]', None,
     [("f", {"a": 1}), ("g", {"b": [2, "]"]})]),
]  # fmt: skip


def counting_ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def streamed(text: str, parser_name: str, cuts: list[int]) -> ParsedMessage:
    """`text` fed to the streaming parser in pieces split at `cuts`, its deltas accumulated the SDK's way."""
    parser = StreamingToolParser(FORMATS[parser_name], counting_ids())
    pieces = [text[start:end] for start, end in itertools.pairwise([0, *cuts, len(text)])]
    deltas: list[StreamDelta] = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    content, calls = "", {}
    for delta in deltas:
        content += delta.content
        for call in delta.tool_calls:
            if call.id is not None:  # a call's first delta: id and name
                assert call.index not in calls and call.index == len(calls), "indices are new and in order"
                calls[call.index] = {"id": call.id, "name": call.name, "arguments": call.arguments}
            else:
                assert call.name is None
                calls[call.index]["arguments"] += call.arguments
    tool_calls = [ParsedToolCall(**calls[index]) for index in sorted(calls)]
    return ParsedMessage(content if content or not calls else None, tool_calls)


@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), RECORDED,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(RECORDED)])  # fmt: skip
def test_extract_finds_the_recorded_calls(parser_name: str, text: str, content: str | None, calls: list) -> None:
    message = extract(text, FORMATS[parser_name], counting_ids())
    assert message.content == content
    assert [(call.name, json.loads(call.arguments)) for call in message.tool_calls] == calls
    assert [call.id for call in message.tool_calls] == [f"call_{i}" for i in range(len(calls))]


@pytest.mark.parametrize(("parser_name", "text"), [case[:2] for case in RECORDED],
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(RECORDED)])  # fmt: skip
def test_streaming_one_character_at_a_time_equals_extract(parser_name: str, text: str) -> None:
    whole = extract(text, FORMATS[parser_name], counting_ids())
    assert streamed(text, parser_name, list(range(1, len(text)))) == whole


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(case=st.sampled_from(RECORDED), data=st.data())
def test_streaming_in_any_chunks_equals_extract(case: tuple, data: st.DataObject) -> None:
    parser_name, text = case[:2]
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=24)))
    assert streamed(text, parser_name, cuts) == extract(text, FORMATS[parser_name], counting_ids())


def test_a_calls_first_delta_carries_its_name_and_later_ones_only_arguments() -> None:
    parser = StreamingToolParser(FORMATS["hermes"], counting_ids())
    first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert first.content == ""
    assert [(c.index, c.id, c.name, c.arguments) for c in first.tool_calls] == [(0, "call_0", "get_weather", '{"ci')]
    second = parser.feed('ty": "Paris"}}\n</tool_call>')
    assert [(c.index, c.id, c.name, c.arguments) for c in second.tool_calls] == [(0, None, None, 'ty": "Paris"}')]


def test_text_that_may_start_a_marker_is_held_until_it_cannot() -> None:
    parser = StreamingToolParser(FORMATS["hermes"], counting_ids())
    assert parser.feed("Sure <tool").content == "Sure"
    assert parser.feed("bar> done").content == " <toolbar> done"
    assert parser.finish().content == ""


def test_a_call_cut_off_after_its_name_stays_a_call_when_streamed() -> None:
    """The documented difference on cut-off output (max_tokens): a streamed call was sent once its name was known;
    the whole-text extraction finds no complete JSON and answers content."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    parsed = streamed(text, "hermes", [20, 40])
    assert [(call.name, call.arguments) for call in parsed.tool_calls] == [("get_weather", '{"city": "Par')]
    assert extract(text, FORMATS["hermes"]).tool_calls == []
    assert extract(text, FORMATS["hermes"]).content == text


_PIECES = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", '{"name": ', '"arguments": ',
           '"parameters": ', '"f"', "{", "}", "[", "]", ",", ";", ":", '"', "\\", "\\x", " ", "\n", "a", "1", "null"]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(parser_name=st.sampled_from(sorted(FORMATS)), pieces=st.lists(st.sampled_from(_PIECES), max_size=40),
       data=st.data())
def test_any_text_parses_without_error_whole_or_streamed(parser_name: str, pieces: list[str],
                                                          data: st.DataObject) -> None:
    """Garbage in (markers, brackets, broken strings and escapes in any order): content or calls out, never an
    exception; and a text that ends in no call is all content, streamed as whole."""
    text = "".join(pieces)
    whole = extract(text, FORMATS[parser_name], counting_ids())
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=12))) if len(text) > 1 else []
    streamed_message = streamed(text, parser_name, cuts)
    if not whole.tool_calls and not streamed_message.tool_calls:
        assert streamed_message.content == whole.content
