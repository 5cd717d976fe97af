"""Engine output deltas to OpenAI responses: whole (non-streaming) or as SSE chunks."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from replicas.contract import CompletionOutput, RequestOutput, TokenLogprobs
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
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from router.streaming import PrimedStream, merge, sse
from router.tools import ToolPlan, ToolStream, finish_reason, to_tool_calls

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

    def add(self, prompt_index: int, output: RequestOutput, count_completion: bool = True) -> None:
        if count_completion:
            self.completion_tokens += sum(len(completion.token_ids) for completion in output.outputs)
        self.cached_tokens[prompt_index] = max(self.cached_tokens.get(prompt_index, 0), output.num_cached_tokens)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())),
        )


def completion_logprobs(
    entries: list[TokenLogprobs], token_text: TokenText, offset: int, logprobs: CompletionLogprobs | None = None
) -> CompletionLogprobs:
    """The legacy completions logprobs shape: parallel lists, top alternatives keyed by token text (appended to
    `logprobs` when given)."""
    logprobs = logprobs or CompletionLogprobs()
    for entry in entries:
        text = token_text(entry.token_id)
        logprobs.tokens.append(text)
        logprobs.token_logprobs.append(entry.logprob)
        logprobs.top_logprobs.append({token_text(token): logprob for token, logprob in entry.top.items()})
        logprobs.text_offset.append(offset)
        offset += len(text)
    return logprobs


def echo_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprobs | None], token_text: TokenText, num_top: int
) -> CompletionLogprobs:
    """The prompt's tokens in the legacy shape (echo with logprobs): the first token's logprob and alternatives are
    null, as OpenAI's; the others carry the engine's prompt logprobs, `num_top` alternatives each."""
    logprobs, offset = CompletionLogprobs(), 0
    for position, token_id in enumerate(prompt_ids):
        entry = entries[position] if position < len(entries) else None
        text = token_text(token_id)
        logprobs.tokens.append(text)
        logprobs.token_logprobs.append(None if entry is None else entry.logprob)
        top = None if entry is None else dict(itertools.islice(entry.top.items(), num_top))
        logprobs.top_logprobs.append(None if top is None else {token_text(t): value for t, value in top.items()})
        logprobs.text_offset.append(offset)
        offset += len(text)
    return logprobs


def vllm_prompt_logprobs(entries: list[TokenLogprobs | None], token_text: TokenText, num_top: int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token `{token id: {logprob, rank, decoded_token}}` holding the token itself
    and the `num_top` most likely (ranked 1..num_top), the first token null."""
    result: PromptLogprobs = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        ranked = {entry.token_id: PromptLogprob(logprob=entry.logprob, rank=entry.rank,
                                                decoded_token=token_text(entry.token_id))}  # fmt: skip
        for rank, (token, logprob) in enumerate(itertools.islice(entry.top.items(), num_top), start=1):
            ranked.setdefault(token, PromptLogprob(logprob=logprob, rank=rank, decoded_token=token_text(token)))
        result.append(ranked)
    return result


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


@dataclass
class CompletionFormat:
    """What a completions request asked of its choices beyond the text."""

    token_text: TokenText
    prompt_ids: list[list[int]]
    logprobs: int | None = None  # legacy logprobs, this many alternatives per token; None: no logprobs
    echo: list[str] | None = None  # each prompt's text, when `echo`
    echo_only: bool = False  # echo with max_tokens 0: the prompt alone, without the token the engine sampled
    prompt_logprobs: int | None = None  # vLLM's extra: each choice's `prompt_logprobs`, this many alternatives
    # `prompt_logprobs`' decoded_token: the text even with return_tokens_as_token_ids (as vLLM); None: token_text
    decoded_text: TokenText | None = None

    def choice(
        self, index: int, prompt_index: int, text: str, entries: list[TokenLogprobs], finish_reason: str | None,
        stop_reason: str | int | None, prompt_entries: list[TokenLogprobs | None] | None, first: bool, offset: int,
    ) -> CompletionChoice:  # fmt: skip
        """A choice (or, streamed, a chunk of one: `first` for its first, `offset` the characters sent before)."""
        if self.echo_only:
            text, entries = "", []
            finish_reason, stop_reason = ("length", None) if finish_reason is not None else (None, None)
        echoing = self.echo is not None and first
        echoed = self.echo[prompt_index] if echoing else ""
        logprobs = None
        if self.logprobs is not None:
            if echoing:
                prompt_ids = self.prompt_ids[prompt_index]
                logprobs = echo_logprobs(prompt_ids, prompt_entries or [], self.token_text, self.logprobs)
            logprobs = completion_logprobs(entries, self.token_text, offset + len(echoed), logprobs)
        prompt_logprobs = None
        if self.prompt_logprobs is not None and first and prompt_entries is not None:
            decoded_text = self.decoded_text or self.token_text
            prompt_logprobs = vllm_prompt_logprobs(prompt_entries, decoded_text, self.prompt_logprobs)
        return CompletionChoice(index=index, text=echoed + text, logprobs=logprobs, finish_reason=finish_reason,
                                stop_reason=stop_reason, prompt_logprobs=prompt_logprobs)  # fmt: skip


async def completion_response(
    streams: list[PrimedStream], n: int, model: str, usage: UsageCounter, options: CompletionFormat
) -> CompletionResponse:
    """The whole completion; with `echo`, each choice's text starts with its prompt."""
    choices: dict[int, _Choice] = {}
    prompt_entries: dict[int, list[TokenLogprobs | None]] = {}
    async for prompt_index, output in merge(streams):
        usage.add(prompt_index, output, count_completion=not options.echo_only)
        if output.prompt_logprobs is not None:
            prompt_entries[prompt_index] = output.prompt_logprobs
        for completion in output.outputs:
            _collect(choices, prompt_index * n + completion.index, completion)
    result = []
    for index in sorted(choices):
        choice = choices[index]
        result.append(options.choice(index, index // n, choice.text, choice.logprobs, choice.finish_reason,
                                     choice.stop_reason, prompt_entries.get(index // n), True, 0))  # fmt: skip
    return CompletionResponse(model=model, choices=result, usage=usage.usage())


async def completion_events(
    streams: list[PrimedStream], n: int, model: str, usage: UsageCounter, options: CompletionFormat,
    include_usage: bool, request_id: str, continuous_usage: bool = False,
) -> AsyncIterator[str]:  # fmt: skip
    """SSE chunks of a streamed completion, then the usage chunk if asked for, then `[DONE]`; with
    `continuous_usage` (vLLM's `continuous_usage_stats`) every chunk carries the usage so far."""
    created = int(time.time())
    offsets: dict[int, int] = {}  # characters of each choice sent so far
    prompt_entries: dict[int, list[TokenLogprobs | None]] = {}  # delta outputs carry them in the first one only
    async for prompt_index, output in merge(streams):
        usage.add(prompt_index, output, count_completion=not options.echo_only)
        if output.prompt_logprobs is not None:
            prompt_entries[prompt_index] = output.prompt_logprobs
        choices = []
        for completion in output.outputs:
            index = prompt_index * n + completion.index
            first = index not in offsets
            if options.echo_only and not first and completion.finish_reason is None:
                continue
            choice = options.choice(index, prompt_index, completion.text, completion.logprobs or [],
                                    completion.finish_reason, completion.stop_reason,
                                    prompt_entries.get(prompt_index), first, offsets.get(index, 0))  # fmt: skip
            offsets[index] = offsets.get(index, 0) + len(choice.text)
            choices.append(choice)
        if choices:
            chunk_usage = usage.usage() if continuous_usage else None
            yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                         usage=chunk_usage))  # fmt: skip
    if include_usage:
        yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage.usage()))
    yield sse("[DONE]")


async def chat_response(
    stream: PrimedStream, model: str, usage: UsageCounter, token_text: TokenText, with_logprobs: bool,
    prompt_logprobs: int | None = None, decoded_text: TokenText | None = None, tools: ToolPlan | None = None,
) -> ChatCompletionResponse:
    """The whole chat completion; with vLLM's `prompt_logprobs`, the rendered prompt's logprobs at the top level
    (`decoded_text` names their tokens, else `token_text`); with `tools`, each choice's calls read from its text."""
    choices: dict[int, _Choice] = {}
    prompt_entries = None
    async for _, output in merge([stream]):
        usage.add(0, output)
        if output.prompt_logprobs is not None:
            prompt_entries = output.prompt_logprobs
        for completion in output.outputs:
            _collect(choices, completion.index, completion)
    result = []
    for index in sorted(choices):
        choice = choices[index]
        logprobs = None
        if with_logprobs:
            logprobs = chat_logprobs(CompletionOutput(0, choice.text, [], logprobs=choice.logprobs), token_text)
        message, reason = AssistantMessage(content=choice.text), choice.finish_reason
        if tools is not None:
            parsed = tools.extract(choice.text)
            message = AssistantMessage(content=parsed.content, tool_calls=to_tool_calls(parsed))
            reason = finish_reason(reason, bool(parsed.tool_calls))
        result.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=reason,
                                 stop_reason=choice.stop_reason))  # fmt: skip
    scored = None
    if prompt_logprobs is not None and prompt_entries is not None:
        scored = vllm_prompt_logprobs(prompt_entries, decoded_text or token_text, prompt_logprobs)
    return ChatCompletionResponse(model=model, choices=result, usage=usage.usage(), prompt_logprobs=scored)


async def chat_events(
    stream: PrimedStream, n: int, model: str, usage: UsageCounter, token_text: TokenText,
    with_logprobs: bool, include_usage: bool, request_id: str, continuous_usage: bool = False,
    tools: ToolPlan | None = None,
) -> AsyncIterator[str]:  # fmt: skip
    """SSE chunks of a streamed chat completion: the role first, then content deltas, then the finish reason; with
    `continuous_usage` (vLLM's `continuous_usage_stats`) every chunk carries the usage so far; with `tools`, content
    and tool-call deltas read from the text as it comes (router/tool_stream.py)."""
    created = int(time.time())
    tool_streams: dict[int, ToolStream] = {}

    def chunk(choices: list[ChatChunkChoice], chunk_usage: Usage | None = None) -> str:
        if chunk_usage is None and continuous_usage:
            chunk_usage = usage.usage()
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=chunk_usage))

    # With tools, content stays null until there is some: a reply of calls alone accumulates to null, as whole.
    first = DeltaMessage(role="assistant", content=None if tools is not None else "")
    yield chunk([ChatChunkChoice(index=index, delta=first) for index in range(n)])
    async for _, output in merge([stream]):
        usage.add(0, output)
        choices = []
        for completion in output.outputs:
            logprobs = chat_logprobs(completion, token_text) if with_logprobs else None
            has_text = completion.text or not completion.finished
            delta = DeltaMessage(content=completion.text) if has_text else DeltaMessage()
            reason = completion.finish_reason
            if tools is not None:
                tool_stream = tool_streams.setdefault(completion.index, tools.stream())
                content, calls = tool_stream.feed(completion.text, completion.finished)
                delta = DeltaMessage(content=content, tool_calls=calls)
                reason = finish_reason(reason, tool_stream.has_calls)
            choices.append(ChatChunkChoice(index=completion.index, delta=delta, logprobs=logprobs,
                                           finish_reason=reason, stop_reason=completion.stop_reason))  # fmt: skip
        if choices:
            yield chunk(choices)
    if include_usage:
        yield chunk([], usage.usage())
    yield sse("[DONE]")
