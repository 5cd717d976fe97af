"""The real `openai` client against the app: completions, chat, streaming, n > 1, stop, seed, /v1/models."""

from __future__ import annotations

import openai
import pytest

from tests.serve.conftest import ServedApp

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(tiny_app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_app.v1, api_key="unused", timeout=60, max_retries=0)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list().data] == ["tiny"]


def test_completion_returns_text_and_usage(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=7, **GREEDY)
    assert completion.object == "text_completion"
    assert len(completion.choices) == 1
    assert completion.choices[0].text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7


def test_streamed_completion_concatenates_to_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt="The sea", max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model="tiny", prompt="The sea", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))  # fmt: skip
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].text
    assert len(chunks) > 2  # tokens arrive as they are produced, not in one piece
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_prompt_as_token_ids_and_as_a_list_of_strings(client: openai.OpenAI) -> None:
    by_ids = client.completions.create(model="tiny", prompt=[510, 3485, 314], max_tokens=4, **GREEDY)
    assert by_ids.usage.prompt_tokens == 3
    several = client.completions.create(model="tiny", prompt=["One", "Two", "Three"], max_tokens=3, n=2, **GREEDY)
    assert sorted(choice.index for choice in several.choices) == list(range(6))
    assert several.usage.completion_tokens == 18


def test_n_samples_come_back_indexed(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, n=3, temperature=1.0, seed=7)
    assert sorted(choice.index for choice in completion.choices) == [0, 1, 2]
    assert len({choice.text for choice in completion.choices}) > 1  # independent samples


def test_same_seed_same_text_other_seed_other_text(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=1.0,
                                         seed=seed).choices[0].text  # fmt: skip

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="A list:", max_tokens=12, **GREEDY).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    stopped = client.completions.create(model="tiny", prompt="A list:", max_tokens=12, stop=[stop], **GREEDY)
    assert stopped.choices[0].text == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs_list_each_token_with_alternatives(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, logprobs=2, **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) <= 2 and top for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == completion.choices[0].text


def test_chat_completion_uses_the_chat_template(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, **GREEDY)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    # The template's default system prompt and role markers make the prompt far longer than "Hi".
    assert chat.usage.prompt_tokens > 20


def test_streamed_chat_sends_the_role_then_content_then_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **GREEDY)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_n_and_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          n=2, temperature=1.0, seed=3, logprobs=True, top_logprobs=2)  # fmt: skip
    assert sorted(choice.index for choice in chat.choices) == [0, 1]
    assert all(len(choice.logprobs.content) == 3 for choice in chat.choices)


def test_echo_prepends_the_prompt_and_logit_bias_forces_a_token(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, **GREEDY)
    echoed = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, echo=True, **GREEDY)
    assert echoed.choices[0].text == "Hello there" + plain.choices[0].text
    streamed = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, echo=True, stream=True,
                                         **GREEDY)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == echoed.choices[0].text
    forced = client.completions.create(model="tiny", prompt="Hello there", max_tokens=3, logit_bias={"777": 100},
                                       **GREEDY).choices[0].text
    assert forced and forced != plain.choices[0].text[: len(forced)]
    assert forced == forced[: len(forced) // 3] * 3  # the same token three times
