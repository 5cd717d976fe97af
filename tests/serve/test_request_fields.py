"""OpenAI's own request fields, deliberately: accepted where they have no effect here, refused with the reason."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve.conftest import ServedApp
from tests.serve.test_bad_requests import post_and_expect_error

CHAT = [{"role": "user", "content": "Hi"}]


def test_chat_accepts_openai_fields_that_change_nothing_here(tiny_app: ServedApp) -> None:
    client = openai.OpenAI(base_url=tiny_app.v1, api_key="unused", timeout=60, max_retries=0)
    plain = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0.0)
    with_fields = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=5, temperature=0.0, store=False, metadata={"team": "eval"},
        service_tier="auto", user="user-1", safety_identifier="hashed-user", prompt_cache_key="conversation-7",
        parallel_tool_calls=True, reasoning_effort="low", response_format={"type": "text"}, modalities=["text"],
        stream_options=None,
    )  # fmt: skip
    assert with_fields.choices[0].message.content == plain.choices[0].message.content


# (name, path, body, param, text the message must contain)
REFUSED = [
    ("store true", "/v1/chat/completions", {"messages": CHAT, "store": True}, "store", "keeps no completions"),
    ("flex service tier", "/v1/chat/completions", {"messages": CHAT, "service_tier": "flex"}, "service_tier",
     "one tier"),
    ("audio output", "/v1/chat/completions", {"messages": CHAT, "audio": {"voice": "alloy", "format": "wav"}},
     "audio", "text only"),
    ("audio modality", "/v1/chat/completions", {"messages": CHAT, "modalities": ["text", "audio"]}, "modalities",
     "audio"),
    ("prediction", "/v1/chat/completions", {"messages": CHAT, "prediction": {"type": "content", "content": "x"}},
     "prediction", "speculative"),
    ("web search", "/v1/chat/completions", {"messages": CHAT, "web_search_options": {}}, "web_search_options",
     "web"),
    ("verbosity", "/v1/chat/completions", {"messages": CHAT, "verbosity": "low"}, "verbosity", "max_tokens"),
    ("json_schema response format without a schema (structured outputs are served)", "/v1/chat/completions",
     {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema", "needs json_schema.schema"),
    ("tools with tool_choice auto on a model with no tool call parser", "/v1/chat/completions",
     {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice",
     "tool_call_parser"),
    ("tool_choice without tools", "/v1/chat/completions", {"messages": CHAT, "tool_choice": "auto"},
     "tool_choice", "needs tools"),
    ("functions (deprecated: use tools)", "/v1/chat/completions",
     {"messages": CHAT, "functions": [{"name": "f"}]}, "functions", "send the functions as `tools`"),
    ("function_call (deprecated: use tool_choice)", "/v1/chat/completions",
     {"messages": CHAT, "function_call": "auto"}, "function_call", "use `tool_choice`"),
    ("obfuscated stream", "/v1/chat/completions",
     {"messages": CHAT, "stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation", "not padded"),
    ("beam search (vLLM)", "/v1/completions", {"prompt": "Hi", "use_beam_search": True}, "use_beam_search",
     "beam search"),
    ("chat template (vLLM)", "/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ 1 }}"},
     "chat_template", "model's own template"),
    ("a chat-only field on completions stays unrecognized", "/v1/completions", {"prompt": "Hi", "store": False},
     "store", "unrecognized"),
    ("a misspelt field stays unrecognized", "/v1/chat/completions", {"messages": CHAT, "stroe": False}, "stroe",
     "unrecognized"),
]


@pytest.mark.parametrize(("path", "body", "param", "message"), [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])  # fmt: skip
def test_unserved_field_is_refused_naming_it_and_why(
    tiny_app: ServedApp, path: str, body: dict, param: str, message: str
) -> None:
    post_and_expect_error(tiny_app, path, body, None, 400, param, message)


def test_null_for_a_refused_field_means_not_set(tiny_app: ServedApp) -> None:
    body = {"messages": CHAT, "max_tokens": 2, "prediction": None, "audio": None, "tools": None}
    response = httpx.post(f"{tiny_app.v1}/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
