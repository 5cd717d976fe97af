"""`tool_choice: auto` through a served app whose model has a tool-calling template and a parser: a tiny seeded
Qwen2-shaped model with Qwen2.5's chat template (hermes-style `<tool_call>` blocks), `tool_call_parser: hermes`.

What this covers, honestly: a random tiny model never writes a tool call by itself, so the tests that read calls
force its output with `guided_regex` to a recorded Qwen2.5-style answer. Everything after sampling is real: the
engine decodes under the regex, and the ingress reads the text with the hermes parser, whole and streamed,
exactly as it would read a trained model's output. Rendering (tools and tool results in the template) is checked
against transformers' own rendering of the same conversation.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from transformers import PreTrainedTokenizerFast

from tests.conftest import build_tiny_llama_like
from tests.serve.conftest import ServedApp

TEMPLATE = Path(__file__).parent / "qwen2_5_tool_template.jinja"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n\\{"name": "get_weather", "arguments": \\{"city": "(Paris|Tokyo)"\\}\\}\n</tool_call>'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    directory = build_tiny_llama_like(tmp_path_factory.mktemp("tiny-qwen2-tools"), "qwen2")
    shutil.copy(TEMPLATE, directory / "chat_template.jinja")
    return directory


@pytest.fixture(scope="module")
def hermes_app(serve_port: int, model_dir: Path) -> Iterator[ServedApp]:
    from ray import serve

    from router.app import build_app

    app = build_app({
        "model": str(model_dir), "served_model_name": "hermes", "replica_num_cpus": 0.25, "ingress_num_cpus": 0.25,
        "engine": {"dtype": "float32", "kv_cache_memory_bytes": 8 * 2**20, "max_num_seqs": 4, "num_threads": 1},
        "ingress": {"tool_call_parser": "hermes"},
    })  # fmt: skip
    serve.run(app, name="hermes", route_prefix="/hermes")
    try:
        yield ServedApp("hermes", f"http://127.0.0.1:{serve_port}/hermes", "hermes")
    finally:
        serve.delete("hermes")


@pytest.fixture(scope="module")
def client(hermes_app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=hermes_app.v1, api_key="unused", max_retries=0, timeout=120)


def _forced(client: openai.OpenAI, regex: str, **request: object) -> object:
    request = {"model": "hermes", "messages": ASK, "tools": TOOLS, "max_tokens": 256, "temperature": 0.0, **request}
    return client.chat.completions.create(**request, extra_body={"guided_regex": regex})


def _streamed(client: openai.OpenAI, regex: str, **request: object) -> tuple[object, str]:
    request = {"model": "hermes", "messages": ASK, "tools": TOOLS, "max_tokens": 256, "temperature": 0.0, **request}
    with client.chat.completions.stream(**request, extra_body={"guided_regex": regex}) as stream:
        for _ in stream:
            pass
        completion = stream.get_final_completion()
    return completion.choices[0].message, completion.choices[0].finish_reason


def test_auto_reads_a_hermes_call_from_the_output(client: openai.OpenAI) -> None:
    choice = _forced(client, CALL).choices[0]  # tool_choice left out: auto, since tools are given
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Tokyo")


def test_auto_streamed_accumulates_to_the_same_message(client: openai.OpenAI) -> None:
    regex = "Let me check\\.\n" + CALL + "\n" + CALL
    whole = _forced(client, regex, tool_choice="auto").choices[0]
    message, finish_reason = _streamed(client, regex, tool_choice="auto")
    assert whole.message.content == message.content == "Let me check."
    assert finish_reason == whole.finish_reason == "tool_calls"
    as_pairs = [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert as_pairs == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert len(as_pairs) == 2


def test_auto_without_a_call_answers_content(client: openai.OpenAI) -> None:
    regex = "The weather is (nice|bad) <today>\\."
    whole = _forced(client, regex).choices[0]
    message, finish_reason = _streamed(client, regex)
    assert whole.message.tool_calls is None and message.tool_calls is None
    assert whole.message.content == message.content and whole.message.content.startswith("The weather is ")
    assert whole.finish_reason == finish_reason == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call(client: openai.OpenAI) -> None:
    regex = CALL + "\n" + CALL
    whole = _forced(client, regex, parallel_tool_calls=False).choices[0]
    message, _ = _streamed(client, regex, parallel_tool_calls=False)
    assert len(whole.message.tool_calls) == len(message.tool_calls) == 1


def test_tool_choice_none_neither_renders_nor_reads_tools(client: openai.OpenAI, model_dir: Path) -> None:
    choice = _forced(client, CALL, tool_choice="none")
    assert choice.choices[0].message.tool_calls is None
    assert choice.choices[0].message.content.startswith("<tool_call>")
    assert choice.usage.prompt_tokens == len(_render(model_dir, ASK, tools=None))


def test_a_conversation_with_tool_results_renders_through_the_template(client: openai.OpenAI, model_dir: Path) -> None:
    arguments = json.dumps({"city": "Paris"})
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": 21}'},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"sky": "clear"}'},
    ]  # fmt: skip
    answer = client.chat.completions.create(model="hermes", messages=messages, tools=TOOLS, max_tokens=16,
                                            temperature=0.0, extra_body={"guided_regex": "It is (warm|cold)\\."})
    assert answer.choices[0].message.content in ("It is warm.", "It is cold.")
    expected = _render(model_dir, messages, tools=TOOLS)
    assert answer.usage.prompt_tokens == len(expected)
    text = _tokenizer(model_dir).decode(expected)
    assert '<tools>\n{"type": "function"' in text and '"arguments": {"city": "Paris"}' in text
    assert text.count("<tool_response>") == 2 and text.count("<|im_start|>user") == 2  # both results in one turn


def test_tokenize_renders_tools_as_chat_does(hermes_app: ServedApp, model_dir: Path) -> None:
    body = {"messages": ASK, "tools": TOOLS}
    response = httpx.post(f"{hermes_app.base_url}/tokenize", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["tokens"] == _render(model_dir, ASK, tools=TOOLS)


def _tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def _render(model_dir: Path, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """transformers' rendering of the conversation (arguments as objects, as templates expect), tokenized."""
    conversation = []
    for message in copy.deepcopy(messages):
        entry = {key: value for key, value in message.items() if value is not None}
        entry["content"] = message.get("content") or ""
        for call in entry.get("tool_calls", []):
            call["function"] = {**call["function"], "arguments": json.loads(call["function"]["arguments"])}
        conversation.append(entry)
    tokenizer = _tokenizer(model_dir)
    text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
