"""Structured outputs through the served app with the OpenAI SDK: `response_format` (pydantic models via `parse`),
vLLM's `guided_*` extras, streaming equal to non-streaming, and 400s naming the field for bad constraints."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.serve.conftest import ServedApp

GREEDY = {"temperature": 0.0}
TOPICS = ["a chef in Paris", "a retired astronaut", "a teenage chess prodigy", "a lighthouse keeper", "a jazz pianist",
          "a marine biologist", "a medieval blacksmith", "a startup founder", "a mountain guide", "a librarian",
          "a fighter pilot", "a beekeeper", "a detective in Tokyo", "a violin maker", "a farmer in Kenya",
          "a robot engineer", "a professional surfer", "a museum curator", "a taxi driver in New York",
          "a school teacher"]  # fmt: skip


class Person(BaseModel):
    """Bounded fields: an unbounded integer or string lets a small model ramble until max_tokens."""

    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    occupation: str = Field(max_length=24)
    mood: Literal["happy", "sad", "calm"]


@pytest.fixture(scope="module")
def client(default_app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=default_app.v1, api_key=default_app.api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(default_app: ServedApp) -> str:
    return default_app.model_id


def _ask(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Describe {topic} as a JSON object with name, age, occupation and mood."}]


def test_parse_returns_a_pydantic_object_for_varied_prompts(client: openai.OpenAI, model: str) -> None:
    def parse(topic: str) -> Person | None:
        completion = client.chat.completions.parse(
            model=model, messages=_ask(topic), response_format=Person, max_tokens=160, **GREEDY
        )
        return completion.choices[0].message.parsed

    with ThreadPoolExecutor(len(TOPICS)) as pool:  # concurrent: constrained rows batched together
        parsed = list(pool.map(parse, TOPICS))
    assert all(isinstance(person, Person) for person in parsed), parsed


def test_json_schema_streamed_gives_the_same_text_as_not_streamed(client: openai.OpenAI, model: str) -> None:
    schema = {"name": "person", "schema": Person.model_json_schema(), "strict": True}
    response_format = {"type": "json_schema", "json_schema": schema}
    whole = client.chat.completions.create(model=model, messages=_ask(TOPICS[0]), response_format=response_format,
                                           max_tokens=96, **GREEDY)  # fmt: skip
    chunks = client.chat.completions.create(model=model, messages=_ask(TOPICS[0]), response_format=response_format,
                                            max_tokens=96, stream=True, **GREEDY)  # fmt: skip
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == whole.choices[0].message.content
    jsonschema.validate(json.loads(streamed), Person.model_json_schema())


def test_json_object_on_completions(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(
        model=model, prompt="A JSON object describing a cat:", max_tokens=64,
        extra_body={"response_format": {"type": "json_object"}}, **GREEDY,
    )  # fmt: skip
    choice = completion.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.text), dict)


def test_guided_regex_and_choice_match_every_sample(client: openai.OpenAI, model: str) -> None:
    regex = r"\d{3}-\d{3}-\d{4}"
    phone = client.completions.create(model=model, prompt="My phone number is ", max_tokens=20, n=4,
                                      temperature=1.0, seed=1, extra_body={"guided_regex": regex})  # fmt: skip
    assert all(re.fullmatch(regex, c.text) for c in phone.choices), [c.text for c in phone.choices]
    choices = ["Paris", "London", "Berlin"]
    capital = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8, n=4,
        temperature=1.0, seed=2, extra_body={"guided_choice": choices},
    )  # fmt: skip
    assert all(c.message.content in choices for c in capital.choices)
    nested = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Yes or no?"}], max_tokens=4,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}}, **GREEDY,
    )  # fmt: skip
    assert nested.choices[0].message.content in ("yes", "no")


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"guided_regex": "([a-z"}, "guided_regex"),
        ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(4000)}}},
         "guided_json"),
    ],
)  # fmt: skip
def test_bad_constraints_get_a_400_naming_the_field(default_app: ServedApp, extra: dict, param: str) -> None:
    body = {"model": default_app.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    response = httpx.post(f"{default_app.v1}/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {default_app.api_key}"})  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
