"""Engine output deltas to OpenAI responses: whole (non-streaming) or as SSE chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from replicas.contract import CompletionOutput, RequestOutput
from router.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from router.streaming import PrimedStream, merge, sse

TokenText = Callable[[int], str]


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list = field(default_factory=list)


@dataclass
class UsageCounter:
    """Token counts over every prompt of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: dict[int, int] = field(default_factory=dict)  # per prompt

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        self.completion_tokens += sum(len(completion.token_ids) for completion in output.outputs)
        self.cached_tokens[prompt_index] = max(self.cached_tokens.get(prompt_index, 0), output.num_cached_tokens)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())),
        )


def completion_logprobs(completion: CompletionOutput, token_text: TokenText, offset: int) -> CompletionLogprobs:
    """The legacy completions logprobs shape: parallel lists, top alternatives keyed by token text."""
    logprobs = CompletionLogprobs()
    for entry in completion.logprobs or []:
        text = token_text(entry.token_id)
        logprobs.tokens.append(text)
        logprobs.token_logprobs.append(entry.logprob)
        logprobs.top_logprobs.append({token_text(token): logprob for token, logprob in entry.top.items()})
        logprobs.text_offset.append(offset)
        offset += len(text)
    return logprobs


def chat_logprobs(completion: CompletionOutput, token_text: TokenText) -> ChatLogprobs:
    content = []
    for entry in completion.logprobs or []:
        text = token_text(entry.token_id)
        top = [
            TopLogprob(token=token_text(token), logprob=logprob, bytes=list(token_text(token).encode()))
            for token, logprob in entry.top.items()
        ]
        content.append(ChatTokenLogprob(token=text, logprob=entry.logprob, bytes=list(text.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def _collect(choices: dict[int, _Choice], index: int, completion: CompletionOutput) -> _Choice:
    choice = choices.setdefault(index, _Choice())
    choice.text += completion.text
    choice.num_tokens += len(completion.token_ids)
    if completion.logprobs:
        choice.logprobs.extend(completion.logprobs)
    if completion.finish_reason is not None:
        choice.finish_reason, choice.stop_reason = completion.finish_reason, completion.stop_reason
    return choice


async def completion_response(
    streams: list[PrimedStream], n: int, model: str, usage: UsageCounter, token_text: TokenText, with_logprobs: bool,
    echo: list[str] | None = None,
) -> CompletionResponse:
    """The whole completion; with `echo`, each choice's text starts with its prompt (`echo[prompt_index]`)."""
    choices: dict[int, _Choice] = {}
    async for prompt_index, output in merge(streams):
        usage.add(prompt_index, output)
        for completion in output.outputs:
            _collect(choices, prompt_index * n + completion.index, completion)
    result = []
    for index in sorted(choices):
        choice = choices[index]
        logprobs = None
        if with_logprobs:
            whole = CompletionOutput(0, choice.text, [], logprobs=choice.logprobs)
            logprobs = completion_logprobs(whole, token_text, 0)
        text = echo[index // n] + choice.text if echo is not None else choice.text
        result.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                       finish_reason=choice.finish_reason, stop_reason=choice.stop_reason))  # fmt: skip
    return CompletionResponse(model=model, choices=result, usage=usage.usage())


async def completion_events(
    streams: list[PrimedStream], n: int, model: str, usage: UsageCounter, token_text: TokenText,
    with_logprobs: bool, include_usage: bool, request_id: str, echo: list[str] | None = None,
    continuous_usage: bool = False,
) -> AsyncIterator[str]:  # fmt: skip
    """SSE chunks of a streamed completion, then the usage chunk if asked for, then `[DONE]`; with
    `continuous_usage` (vLLM's `continuous_usage_stats`) every chunk carries the usage so far."""
    created = int(time.time())
    offsets: dict[int, int] = {}
    async for prompt_index, output in merge(streams):
        usage.add(prompt_index, output)
        choices = []
        for completion in output.outputs:
            index = prompt_index * n + completion.index
            logprobs = None
            if with_logprobs:
                logprobs = completion_logprobs(completion, token_text, offsets.get(index, 0))
            text = completion.text
            if echo is not None and index not in offsets:  # the first chunk of a choice carries its prompt
                text = echo[prompt_index] + text
            offsets[index] = offsets.get(index, 0) + len(completion.text)
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=completion.finish_reason,
                                            stop_reason=completion.stop_reason))  # fmt: skip
        if choices:
            chunk_usage = usage.usage() if continuous_usage else None
            yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                         usage=chunk_usage))  # fmt: skip
    if include_usage:
        yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage.usage()))
    yield sse("[DONE]")


async def chat_response(
    stream: PrimedStream, model: str, usage: UsageCounter, token_text: TokenText, with_logprobs: bool
) -> ChatCompletionResponse:
    choices: dict[int, _Choice] = {}
    async for _, output in merge([stream]):
        usage.add(0, output)
        for completion in output.outputs:
            _collect(choices, completion.index, completion)
    result = []
    for index in sorted(choices):
        choice = choices[index]
        logprobs = None
        if with_logprobs:
            logprobs = chat_logprobs(CompletionOutput(0, choice.text, [], logprobs=choice.logprobs), token_text)
        result.append(ChatChoice(index=index, message=AssistantMessage(content=choice.text), logprobs=logprobs,
                                 finish_reason=choice.finish_reason, stop_reason=choice.stop_reason))  # fmt: skip
    return ChatCompletionResponse(model=model, choices=result, usage=usage.usage())


async def chat_events(
    stream: PrimedStream, n: int, model: str, usage: UsageCounter, token_text: TokenText,
    with_logprobs: bool, include_usage: bool, request_id: str, continuous_usage: bool = False,
) -> AsyncIterator[str]:  # fmt: skip
    """SSE chunks of a streamed chat completion: the role first, then content deltas, then the finish reason; with
    `continuous_usage` (vLLM's `continuous_usage_stats`) every chunk carries the usage so far."""
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], chunk_usage: Usage | None = None) -> str:
        if chunk_usage is None and continuous_usage:
            chunk_usage = usage.usage()
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=chunk_usage))

    yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content="")) for index in range(n)])
    async for _, output in merge([stream]):
        usage.add(0, output)
        choices = []
        for completion in output.outputs:
            logprobs = chat_logprobs(completion, token_text) if with_logprobs else None
            has_text = completion.text or not completion.finished
            delta = DeltaMessage(content=completion.text) if has_text else DeltaMessage()
            choices.append(ChatChunkChoice(index=completion.index, delta=delta, logprobs=logprobs,
                                           finish_reason=completion.finish_reason,
                                           stop_reason=completion.stop_reason))  # fmt: skip
        if choices:
            yield chunk(choices)
    if include_usage:
        yield chunk([], usage.usage())
    yield sse("[DONE]")
