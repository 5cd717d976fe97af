"""The ingress's request-field helpers, without a server: truncation, request ids, refusals, special tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from router.errors import APIError
from router.fields import REFUSED_CHAT_FIELDS, REFUSED_VLLM_FIELDS, check_field_values, refuse_known_fields
from router.params import truncate_prompt
from router.protocol import ChatCompletionRequest, ChatMessage
from router.request_ids import make_request_ids
from router.tokenization import PromptTokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"


def test_truncate_prompt_keeps_the_last_tokens() -> None:
    assert truncate_prompt([1, 2, 3, 4, 5], 2, max_model_len=10) == [4, 5]
    assert truncate_prompt([1, 2, 3], 5, max_model_len=10) == [1, 2, 3]
    assert truncate_prompt(list(range(20)), -1, max_model_len=8) == list(range(12, 20))
    assert truncate_prompt([1, 2], None, max_model_len=8) == [1, 2]


@pytest.mark.parametrize("truncate_prompt_tokens", [0, 9])
def test_truncate_prompt_refuses_zero_and_more_than_the_context(truncate_prompt_tokens: int) -> None:
    with pytest.raises(APIError) as refused:
        truncate_prompt([1, 2], truncate_prompt_tokens, max_model_len=8)
    assert refused.value.param == "truncate_prompt_tokens"


def test_client_request_ids_name_the_response_and_engine_ids_stay_unique() -> None:
    first, second = make_request_ids("cmpl", "trace-1", None), make_request_ids("cmpl", "trace-1", None)
    assert first.response_id == second.response_id == "cmpl-trace-1"
    assert first.engine_id != second.engine_id and first.engine_id.startswith("cmpl-trace-1-")
    assert make_request_ids("chatcmpl", "header", "body").response_id == "chatcmpl-body"
    random_ids = make_request_ids("cmpl", None, None)
    assert random_ids.response_id == random_ids.engine_id


def test_an_overlong_request_id_is_refused() -> None:
    with pytest.raises(APIError) as refused:
        make_request_ids("cmpl", None, "x" * 129)
    assert refused.value.param == "request_id"


def test_known_unsupported_fields_are_refused_with_the_reason_and_null_is_not_set() -> None:
    with pytest.raises(APIError) as refused:
        refuse_known_fields({"messages": [], "prediction": {"type": "content"}}, REFUSED_CHAT_FIELDS)
    assert refused.value.param == "prediction" and "speculative" in refused.value.message
    assert refuse_known_fields({"messages": [], "audio": None}, REFUSED_CHAT_FIELDS) == {"messages": []}


def test_prompt_logprobs_is_served_not_refused() -> None:
    payload = {"prompt": "Hi", "prompt_logprobs": 1}
    assert "prompt_logprobs" not in REFUSED_VLLM_FIELDS and "prompt_logprobs" not in REFUSED_CHAT_FIELDS
    assert refuse_known_fields(payload, REFUSED_VLLM_FIELDS) == payload


@pytest.mark.parametrize(("field", "value"), [("store", True), ("service_tier", "flex"), ("modalities", ["audio"])])
def test_values_this_server_cannot_honour_are_refused(field: str, value: object) -> None:
    request = ChatCompletionRequest(messages=[ChatMessage(role="user", content="Hi")], **{field: value})
    with pytest.raises(APIError) as refused:
        check_field_values(request)
    assert refused.value.param == field


def test_harmless_values_pass() -> None:
    request = ChatCompletionRequest(messages=[ChatMessage(role="user", content="Hi")], store=False,
                                    service_tier="auto", modalities=["text"], response_format={"type": "text"},
                                    metadata={"k": "v"})  # fmt: skip
    check_field_values(request)


@pytest.mark.parametrize("response_format", [{"type": "text"}, {"type": "json_object"},
                                             {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}])
def test_structured_output_response_formats_pass(response_format: dict) -> None:
    request = ChatCompletionRequest(messages=[ChatMessage(role="user", content="Hi")], response_format=response_format)
    check_field_values(request)


def test_structured_output_and_tool_fields_are_served_and_the_deprecated_function_fields_refused() -> None:
    served = {"response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
              "structured_outputs", "tools", "tool_choice", "parallel_tool_calls"}  # fmt: skip
    assert not served & (REFUSED_CHAT_FIELDS.keys() | REFUSED_VLLM_FIELDS.keys())
    assert {"functions", "function_call"} <= REFUSED_CHAT_FIELDS.keys()
    payload = {"messages": [], "guided_choice": ["a", "b"], "structured_outputs": {"regex": "a+"}}
    assert refuse_known_fields(payload, {**REFUSED_CHAT_FIELDS, **REFUSED_VLLM_FIELDS}) == payload


@pytest.fixture(scope="module")
def bos_adding_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    """SmolLM2's tokenizer with a post-processor that prepends BOS, as Llama's and Mistral's do."""
    directory = tmp_path_factory.mktemp("bos-tokenizer")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (DEFAULT_MODEL_DIR / name).exists():
            shutil.copy(DEFAULT_MODEL_DIR / name, directory / name)
    tokenizer = json.loads((DEFAULT_MODEL_DIR / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return PromptTokenizer(str(directory))


def test_add_special_tokens_adds_bos_to_text_prompts_only_when_asked(bos_adding_tokenizer: PromptTokenizer) -> None:
    with_specials = bos_adding_tokenizer.completion_prompts("Hi", add_special_tokens=True)[0]
    without = bos_adding_tokenizer.completion_prompts("Hi", add_special_tokens=False)[0]
    assert with_specials == [1, *without]
    assert bos_adding_tokenizer.completion_prompts([5, 6], add_special_tokens=True) == [[5, 6]]  # ids as given


def test_chat_adds_no_second_bos_unless_asked(bos_adding_tokenizer: PromptTokenizer) -> None:
    messages = [ChatMessage(role="user", content="Hi")]
    plain = bos_adding_tokenizer.chat_prompt(messages)
    assert bos_adding_tokenizer.chat_prompt(messages, add_special_tokens=True) == [1, *plain]
