"""OpenAI request fields to SamplingParams: defaults, the context window, caps, and errors naming the field."""

from __future__ import annotations

import pytest

from router.errors import APIError
from router.params import check_unsupported, to_sampling_params
from router.protocol import ChatCompletionRequest, CompletionRequest

MAX_MODEL_LEN = 1024


def params(num_prompt_tokens: int = 10, **fields):
    return to_sampling_params(CompletionRequest(prompt="x", **fields), num_prompt_tokens, MAX_MODEL_LEN, max_n=8)


def error_of(call) -> APIError:
    with pytest.raises(APIError) as caught:
        call()
    return caught.value


def test_max_tokens_defaults_to_the_rest_of_the_context() -> None:
    assert params(num_prompt_tokens=24).max_tokens == MAX_MODEL_LEN - 24


def test_openai_fields_and_vllm_extras_carry_over() -> None:
    sampling = params(temperature=0.5, top_p=0.9, n=2, stop="\n", seed=3, presence_penalty=0.1, top_k=5, min_p=0.1,
                      repetition_penalty=1.1, ignore_eos=True, min_tokens=2, stop_token_ids=[7], logprobs=3)  # fmt: skip
    assert (sampling.temperature, sampling.top_p, sampling.n, sampling.stop, sampling.seed) == (0.5, 0.9, 2, ["\n"], 3)
    assert (sampling.top_k, sampling.min_p, sampling.repetition_penalty, sampling.logprobs) == (5, 0.1, 1.1, 3)
    assert sampling.ignore_eos and sampling.min_tokens == 2 and sampling.stop_token_ids == [7]


def test_prompt_plus_max_tokens_over_the_context_names_both_numbers() -> None:
    error = error_of(lambda: params(num_prompt_tokens=1000, max_tokens=100))
    assert error.status_code == 400 and error.param == "max_tokens"
    assert "1000" in error.message and "100" in error.message and "1024" in error.message


def test_a_prompt_filling_the_context_is_refused() -> None:
    error = error_of(lambda: params(num_prompt_tokens=MAX_MODEL_LEN))
    assert error.param == "prompt" and error.code == "context_length_exceeded"


def test_sampling_params_range_errors_name_the_field() -> None:
    assert error_of(lambda: params(temperature=-1)).param == "temperature"
    assert error_of(lambda: params(n=9)).param == "n"


def test_chat_max_completion_tokens_wins_and_logprobs_map_to_top_logprobs() -> None:
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                    max_completion_tokens=7, logprobs=True, top_logprobs=2)  # fmt: skip
    sampling = to_sampling_params(request, 10, MAX_MODEL_LEN, max_n=8)
    assert sampling.max_tokens == 7 and sampling.logprobs == 2


@pytest.mark.parametrize(("fields", "param"), [({"suffix": "x"}, "suffix"),
                                               ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs")])
def test_unsupported_fields_are_refused_not_ignored(fields: dict, param: str) -> None:
    assert error_of(lambda: check_unsupported(CompletionRequest(prompt="x", **fields))).param == param


def test_echo_with_logprobs_asks_the_engine_for_prompt_logprobs() -> None:
    assert params(echo=True, logprobs=3).prompt_logprobs == 3
    assert params(logprobs=3).prompt_logprobs is None
    assert params(echo=True, logprobs=1, prompt_logprobs=4).prompt_logprobs == 4


def test_echo_with_max_tokens_zero_runs_one_engine_token_and_without_echo_is_refused() -> None:
    assert params(echo=True, max_tokens=0, logprobs=1).max_tokens == 1
    assert error_of(lambda: params(max_tokens=0)).param == "max_tokens"


def test_chat_prompt_logprobs_carry_over() -> None:
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], prompt_logprobs=2)
    assert to_sampling_params(request, 10, MAX_MODEL_LEN, max_n=8).prompt_logprobs == 2


def test_logit_bias_keys_become_token_ids() -> None:
    request = CompletionRequest(prompt="x", logit_bias={"17": -100, "3": 2.5})
    assert to_sampling_params(request, 10, MAX_MODEL_LEN, max_n=8).logit_bias == {17: -100.0, 3: 2.5}
