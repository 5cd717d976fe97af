"""OpenAI request fields to `replicas.SamplingParams`, with the context-window and fan-out limits checked here."""

from __future__ import annotations

from pydantic import ValidationError

from replicas.sampling_params import SamplingParams
from router.errors import bad_request, from_validation_error
from router.protocol import ChatCompletionRequest, CompletionRequest
from router.structured_outputs import to_structured_output
from router.tools import ToolPlan

# Fields copied as they are when the client set them; ranges are SamplingParams' to check.
_PASSTHROUGH = (
    "n", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
    "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids", "include_stop_str_in_output",
    "skip_special_tokens",
)  # fmt: skip


def check_unsupported(request: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse, rather than ignore, the OpenAI fields this server does not implement yet."""
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise bad_request("suffix is not supported: leave it out", "suffix")
        if request.stream and request.best_of is not None and request.best_of > request.n:
            raise bad_request("best_of > n cannot be streamed: set stream=false or best_of=n", "best_of")
    if request.stream and request.prompt_logprobs is not None:
        raise bad_request("prompt_logprobs cannot be streamed (as in vLLM): set stream=false", "prompt_logprobs")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")


def truncate_prompt(prompt_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: keep the prompt's last N tokens (-1: the last `max_model_len`)."""
    if truncate_prompt_tokens is None:
        return prompt_ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    if keep == 0:
        raise bad_request("truncate_prompt_tokens must be -1 or at least 1", "truncate_prompt_tokens")
    if keep > max_model_len:
        raise bad_request(f"truncate_prompt_tokens is {keep}; max_model_len is {max_model_len}: lower it",
                          "truncate_prompt_tokens")  # fmt: skip
    return prompt_ids[-keep:]


def _token_bias(logit_bias: dict[str, float]) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings); the engine checks they are in the vocabulary."""
    try:
        return {int(token_id): float(bias) for token_id, bias in logit_bias.items()}
    except (TypeError, ValueError) as error:
        raise bad_request(f"logit_bias keys must be token ids (integers as strings): {error}", "logit_bias") from error


def to_sampling_params(
    request: CompletionRequest | ChatCompletionRequest,
    num_prompt_tokens: int,
    max_model_len: int,
    max_n: int,
    tools: ToolPlan | None = None,
) -> SamplingParams:
    """The request's sampling parameters; `max_tokens` defaults to what is left of the context window. `tools`:
    a chat request's tool plan (its grammar for required/named tool choices, special tokens its parser reads)."""
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"prompt is {num_prompt_tokens} tokens; max_model_len is {max_model_len}: shorten the prompt so at "
            "least one token can be generated",
            "prompt" if isinstance(request, CompletionRequest) else "messages",
            code="context_length_exceeded",
        )
    fields: dict[str, object] = {name: getattr(request, name) for name in _PASSTHROUGH}
    fields = {name: value for name, value in fields.items() if value is not None}
    if request.logit_bias:
        fields["logit_bias"] = _token_bias(request.logit_bias)
    if request.n > max_n:
        raise bad_request(f"n is {request.n}; this server allows at most {max_n} completions per request", "n")

    max_tokens_param = "max_tokens"
    if isinstance(request, ChatCompletionRequest):
        if request.max_completion_tokens is not None:
            max_tokens, max_tokens_param = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens = request.max_tokens
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if request.logprobs:
            fields["logprobs"] = request.top_logprobs or 0
        if request.prompt_logprobs is not None:
            fields["prompt_logprobs"] = request.prompt_logprobs
    else:
        max_tokens = request.max_tokens
        if request.best_of is not None:
            if request.best_of > max_n:
                raise bad_request(f"best_of is {request.best_of}; this server allows at most {max_n}", "best_of")
            fields["best_of"] = request.best_of
        if request.logprobs is not None:
            fields["logprobs"] = request.logprobs
        # Echo with logprobs scores the prompt too: the engine's prompt logprobs, as wide as either field asks.
        widths = [request.prompt_logprobs, request.logprobs if request.echo else None]
        if any(width is not None for width in widths):
            fields["prompt_logprobs"] = max(width for width in widths if width is not None)
        if request.echo and max_tokens == 0:
            # NOTE: the prompt alone (what vLLM answers, and what loglikelihood scorers may ask): the engine samples
            # one token, which the response leaves out.
            max_tokens = 1

    if max_tokens is None:
        max_tokens = max_model_len - num_prompt_tokens
    elif max_tokens >= 1 and num_prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"prompt is {num_prompt_tokens} tokens and {max_tokens_param} is {max_tokens}: together "
            f"{num_prompt_tokens + max_tokens}, over max_model_len {max_model_len}; lower {max_tokens_param} to at "
            f"most {max_model_len - num_prompt_tokens} or shorten the prompt",
            max_tokens_param,
            code="context_length_exceeded",
        )
    fields["max_tokens"] = max_tokens
    if (structured_output := to_structured_output(request)) is not None:
        fields["structured_output"] = structured_output
    if tools is not None and tools.structured_output is not None:
        fields["structured_output"] = tools.structured_output  # plan_tools refused a second constraint
    if tools is not None and tools.keeps_special_tokens and request.skip_special_tokens is None:
        fields["skip_special_tokens"] = False  # the parser's markers are special tokens
    try:
        return SamplingParams(**fields)
    except ValidationError as error:
        api_error = from_validation_error(error)
        if api_error.param == "max_tokens" and max_tokens_param != "max_tokens":
            api_error.param = max_tokens_param
        if api_error.param == "logprobs" and isinstance(request, ChatCompletionRequest):
            api_error.param = "top_logprobs"
        if api_error.param == "prompt_logprobs" and isinstance(request, CompletionRequest):
            api_error.param = "logprobs" if request.prompt_logprobs is None else "prompt_logprobs"
        raise api_error from error
