"""OpenAI-compatible request and response schemas (the subset this server implements, plus vLLM's extras)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from router.tool_protocol import ChatTool, DeltaToolCall, ToolCall, ToolCallRequest, ToolChoice


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    """Unknown fields are refused, as OpenAI does, so a misspelt parameter is never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = Field(default=False, description="a last chunk with the whole request's usage")
    # vLLM extra (guidellm sends it): every chunk carries the usage so far.
    continuous_usage_stats: bool = Field(default=False, description="usage so far in every chunk")
    include_obfuscation: bool | None = None  # OpenAI's padding against size side channels: only `false` is accepted


class JsonSchemaFormat(_Request):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`: `text` (no constraint, the default), `json_object` or `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Request):
    """vLLM's `structured_outputs` extra (the successor of its `guided_*` fields): one constraint."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions; ranges are checked by `replicas.SamplingParams`."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # no effect: no per-user accounting here
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras (the openai client sends them with `extra_body`).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool = True  # no effect either way: see README "Request fields"
    add_special_tokens: bool | None = None  # default: True for completions, False for chat (the template adds them)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, description="keep the last N; -1: max_model_len")
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:N"
    request_id: str | None = Field(default=None, max_length=128, description="the response id (over X-Request-Id)")
    priority: int = Field(
        default=0, description="lower runs first under the `priority` and `fair` scheduling policies; fcfs ignores it"
    )
    # Structured outputs (router/structured_outputs.py): OpenAI's `response_format`, vLLM's `guided_*` extras and
    # its `structured_outputs` object; at most one of them.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsRequest | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False  # with logprobs: the prompt's tokens are scored too; with max_tokens 0: the prompt alone
    suffix: str | None = None
    prompt_logprobs: int | None = None  # vLLM extra: each choice's `prompt_logprobs`, this many alternatives


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    # Tool calling (router/tools.py): an assistant's calls (its content may then be null), and the call a tool
    # message answers.
    tool_calls: list[ToolCallRequest] | None = None
    tool_call_id: str | None = Field(default=None, validate_default=True)

    @field_validator("tool_calls")
    @classmethod
    def _calls_are_the_assistants(cls, tool_calls: list | None, info: ValidationInfo) -> list | None:
        if tool_calls is not None and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return tool_calls

    @field_validator("tool_call_id")
    @classmethod
    def _tool_messages_name_their_call(cls, tool_call_id: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role")
        if role == "tool" and not tool_call_id:
            raise ValueError("a tool message needs tool_call_id: the id of the assistant's tool call it answers")
        if role != "tool" and tool_call_id is not None:
            raise ValueError("only tool messages carry tool_call_id")
        return tool_call_id

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM extra
    prompt_logprobs: int | None = None  # vLLM extra: the response's `prompt_logprobs`, this many alternatives
    # OpenAI's chat fields accepted with no effect on a self-hosted server (README "Request fields"); refused
    # values are in router/fields.py. `response_format` (structured outputs) is in _SamplingFields.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Tool calling (router/tools.py). `parallel_tool_calls: false`: at most one call per choice.
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = Field(default=None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None


class GenerateRequest(BaseModel):
    """The seed's `/generate` body: a prompt and, optionally, how many tokens to generate."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)  # checked here: the context clamp below would hide a bad one
    temperature: float | None = None
    # Extensions for the benchmark's load generator (bench/loadgen.py), served the same way by its baselines:
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False  # SSE: {"index", "text", "num_tokens"} deltas, then {"usage": {...}}, then [DONE]


# --- responses ---------------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's `Logprob`: one entry of a prompt position's `{token id: ...}` map."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's `prompt_logprobs`: per prompt token (the first is null), the token itself and the top alternatives.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TokenizeRequest(_Request):
    """vLLM's `/tokenize`: a `prompt` as completions would tokenize it, or `messages` as chat would."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[ChatTool] | None = None  # rendered with `messages`, as chat with tool_choice auto would


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "paged-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
