"""The Serve ingress: an OpenAI-compatible API (and the seed's `/generate`) in front of the engine replicas."""


import asyncio
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from replicas.contract import ModelInfo, ResumeState, prefix_block_hashes
from replicas.sampling_params import SamplingParams
from router import responses
from router.admission import AdmissionLimit, ConcurrencyLimitMiddleware
from router.errors import APIError, bad_request, from_validation_error, http_status_error
from router.metrics import RequestMetricsMiddleware, record_migration, start_migration_series
from router.migration import MigrationPolicy, migrating_outputs
from router.openapi_schema import add_request_schemas, json_body
from router.fields import REFUSED_CHAT_FIELDS, REFUSED_VLLM_FIELDS, check_field_values, refuse_known_fields
from router.params import check_unsupported, to_sampling_params, truncate_prompt
from router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    ModelCard,
    ModelList,
    StreamOptions,
    TokenizeRequest,
    TokenizeResponse,
    random_id,
)
from router.request_ids import REQUEST_ID_HEADER, make_request_ids
from router.streaming import PrimedStream, own_request_id, prime, replica_outputs, sse, to_api_error
from router.tokenization import PromptTokenizer
from router.tool_parsers import ToolParserName
from router.tools import plan_tools

logger = logging.getLogger(__name__)

API_KEY_ENV = "PAGED_SERVE_API_KEY"
# Hashes of at most this many leading blocks travel with a request: deeper prefixes add little routing signal.
MAX_ROUTED_BLOCKS = 256

# NOTE: the schema is served by an authorized route below (`openapi_url=None` drops FastAPI's open one).
app = FastAPI(title="paged-serve", docs_url=None, redoc_url=None, openapi_url=None)
# Requests in flight in this ingress replica; the cap is set from IngressConfig when the replica starts.
ADMISSION = AdmissionLimit()
app.add_middleware(ConcurrencyLimitMiddleware, limit=ADMISSION)
app.add_middleware(RequestMetricsMiddleware)  # outermost: counts every answer, the cap's 503s too (router/metrics.py)
add_request_schemas(app, [CompletionRequest, ChatCompletionRequest, GenerateRequest, TokenizeRequest,
                          DetokenizeRequest])
# Fields refused with a reason before validation (router/fields.py); the chat ones are not in OpenAI's completions.
_REFUSED_COMPLETION_FIELDS = REFUSED_VLLM_FIELDS
_REFUSED_CHAT_FIELDS = {**REFUSED_CHAT_FIELDS, **REFUSED_VLLM_FIELDS}
# Serve's own queue in front of the ingress answers overflow in plain text: keep its slots well above the cap.
INGRESS_MAX_ONGOING_REQUESTS = 4096


class IngressConfig(BaseModel):
    """The ingress's own settings (the engine's are the replica's)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="model directory: the tokenizer and chat template are loaded from it")
    tokenizer: str | None = None
    served_model_name: str | None = Field(default=None, description="the `model` id clients send; default: dir name")
    api_key: SecretStr | None = Field(default=None, description=f"require this bearer token; default: ${API_KEY_ENV}")
    max_n: int = Field(default=16, ge=1, description="most completions (n, best_of) per request")
    max_prompts: int = Field(default=64, ge=1, description="most prompts in one completions request")
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024, description="larger request bodies get 413")
    max_concurrent_requests: int = Field(
        default=512, ge=1, lt=INGRESS_MAX_ONGOING_REQUESTS, description="more in flight per ingress replica: 503"
    )
    overload_retry_after_s: float = Field(default=1.0, ge=0, description="Retry-After of that 503")
    generate_max_tokens: int = Field(default=128, ge=1, description="`/generate`'s default token count")
    max_migrations: int = Field(
        default=2, ge=0, description="times a request is resumed on another replica when its own is lost (0: never)"
    )
    migration_deadline_s: float = Field(
        default=120.0, gt=0,
        description="no migration after this many seconds of a request; a resumed call waits this long at most, "
        "and so does a new request for its first output (then 503: no replica running, or all saturated)",
    )
    tool_call_parser: ToolParserName | None = Field(
        default=None, description="how this model writes tool calls (for tool_choice auto); None: auto is refused"
    )

    def model_id(self) -> str:
        return self.served_model_name or Path(self.model).name


@app.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return http_status_error(error.status_code, str(error.detail) if error.detail else None).response()


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    message = f"internal error: {type(error).__name__}; see the server log"
    return APIError(500, message, code="internal_error").response()


def _event_stream(events: AsyncIterator[str], streams: list[PrimedStream]) -> StreamingResponse:
    """SSE; an error after the first byte is sent as an error event, since the status is already 200."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as error:
            yield sse(error.body())
            yield sse("[DONE]")
        finally:
            for stream in streams:
                await stream.aclose()

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _generate_events(stream: AsyncIterator[Any], num_prompt_tokens: int) -> AsyncIterator[str]:
    """`/generate`'s SSE stream: one event per completion delta, then the token counts."""
    num_tokens = 0
    async for output in stream:
        for completion in output.outputs:
            num_tokens += len(completion.token_ids)
            yield sse({"index": completion.index, "text": completion.text, "num_tokens": len(completion.token_ids)})
    yield sse({"usage": {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_tokens}})
    yield sse("[DONE]")


def _usage_in_stream(options: StreamOptions | None) -> tuple[bool, bool]:
    """(a last chunk with the usage, the usage so far in every chunk)."""
    if options is None:
        return False, False
    return options.include_usage, options.continuous_usage_stats


def _token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS, max_queued_requests=512)
@serve.ingress(app)
class OpenAIIngress:
    """Validates and tokenizes requests, streams them to an `LLMReplica`, and shapes the answers."""

    def __init__(self, replica: DeploymentHandle, config: dict[str, Any]) -> None:
        self.config = IngressConfig(**config)
        ADMISSION.max_in_flight = self.config.max_concurrent_requests
        ADMISSION.retry_after_s = self.config.overload_retry_after_s
        # NOTE: a SecretStr, so the key never shows in a repr or a log line.
        api_key = (self.config.api_key.get_secret_value() if self.config.api_key else None) or os.environ.get(
            API_KEY_ENV
        )
        self._api_key = api_key.encode() if api_key else None
        self.tokenizer = PromptTokenizer(self.config.tokenizer or self.config.model)
        self.replica = replica  # unary calls (model_info)
        self.replica_streams = replica.options(stream=True)  # generate
        self._model_info: ModelInfo | None = None
        self._model_info_lock = asyncio.Lock()
        self.migration = MigrationPolicy(self.config.max_migrations, self.config.migration_deadline_s)
        start_migration_series()
        self.model_id = self.config.model_id()
        logger.info("ingress ready: model %s, API key %s", self.model_id, "required" if api_key else "off")

    # --- endpoints --------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness of the ingress; replica health is Serve's to check (`LLMReplica.check_health`)."""
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict[str, Any]:
        """The API's OpenAPI schema (behind the API key, like every route but /health)."""
        self._authorize(request)
        return app.openapi()

    @app.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        try:
            info = await self.model_info()
        except APIError:  # no replica up yet: list the model anyway
            info = None
        return ModelList(data=[ModelCard(id=self.model_id, max_model_len=info.max_model_len if info else None)])

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        self._authorize(request)
        body = await self._parse(request, CompletionRequest, _REFUSED_COMPLETION_FIELDS)
        check_unsupported(body)
        check_field_values(body)
        self._check_model(body.model)
        request_ids = make_request_ids("cmpl", request.headers.get(REQUEST_ID_HEADER), body.request_id)
        info = await self.model_info()
        add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
        prompts = self.tokenizer.completion_prompts(body.prompt, add_special_tokens)
        prompts = [truncate_prompt(prompt_ids, body.truncate_prompt_tokens, info.max_model_len) for prompt_ids in prompts]
        if len(prompts) > self.config.max_prompts:
            raise bad_request(f"{len(prompts)} prompts; at most {self.config.max_prompts} per request", "prompt")
        calls = []
        for prompt_ids in prompts:
            params = to_sampling_params(body, len(prompt_ids), info.max_model_len, self._max_n(info))
            calls.append((prompt_ids, params))
        streams = await prime([self._generate(f"{request_ids.engine_id}-{i}", prompt_ids, params, body.priority)
                               for i, (prompt_ids, params) in enumerate(calls)])  # fmt: skip
        usage = responses.UsageCounter(prompt_tokens=sum(len(prompt_ids) for prompt_ids in prompts))
        options = responses.CompletionFormat(
            self._token_text(body.return_tokens_as_token_ids), prompts, body.logprobs,
            echo=[self.tokenizer.decode(prompt_ids) for prompt_ids in prompts] if body.echo else None,
            echo_only=body.echo and body.max_tokens == 0, prompt_logprobs=body.prompt_logprobs,
            decoded_text=self.tokenizer.token_text,
        )  # fmt: skip
        if body.stream:
            include_usage, continuous_usage = _usage_in_stream(body.stream_options)
            events = responses.completion_events(streams, body.n, self.model_id, usage, options, include_usage,
                                                 request_ids.response_id, continuous_usage)  # fmt: skip
            return _event_stream(events, streams)
        response = await responses.completion_response(streams, body.n, self.model_id, usage, options)
        response.id = request_ids.response_id
        return response

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Any:
        self._authorize(request)
        body = await self._parse(request, ChatCompletionRequest, _REFUSED_CHAT_FIELDS)
        check_unsupported(body)
        check_field_values(body)
        self._check_model(body.model)
        request_ids = make_request_ids("chatcmpl", request.headers.get(REQUEST_ID_HEADER), body.request_id)
        info = await self.model_info()
        # NOTE: vLLM hands `reasoning_effort` to the chat template too; a template that does not read it ignores it.
        template_variables = {"reasoning_effort": body.reasoning_effort} if body.reasoning_effort else None
        tools = plan_tools(body, self.config.tool_call_parser)
        prompt_ids = self.tokenizer.chat_prompt(body.messages, body.add_generation_prompt,
                                                bool(body.add_special_tokens), template_variables,
                                                tools.template_tools())  # fmt: skip
        prompt_ids = truncate_prompt(prompt_ids, body.truncate_prompt_tokens, info.max_model_len)
        params = to_sampling_params(body, len(prompt_ids), info.max_model_len, self._max_n(info), tools)
        tools = tools if tools.reads_calls else None
        (stream,) = await prime([self._generate(request_ids.engine_id, prompt_ids, params, body.priority)])
        usage = responses.UsageCounter(prompt_tokens=len(prompt_ids))
        token_text = self._token_text(body.return_tokens_as_token_ids)
        if body.stream:
            include_usage, continuous_usage = _usage_in_stream(body.stream_options)
            events = responses.chat_events(stream, body.n, self.model_id, usage, token_text, body.logprobs,
                                           include_usage, request_ids.response_id, continuous_usage, tools)  # fmt: skip
            return _event_stream(events, [stream])
        response = await responses.chat_response(stream, self.model_id, usage, token_text, body.logprobs,
                                                 body.prompt_logprobs, self.tokenizer.token_text, tools)  # fmt: skip
        response.id = request_ids.response_id
        return response

    @app.post("/tokenize", openapi_extra=json_body(TokenizeRequest))
    async def tokenize(self, request: Request) -> TokenizeResponse:
        """vLLM's `/tokenize`: a `prompt` tokenized as completions would, or `messages` rendered and tokenized as
        chat would (no truncation), with the context length to compare against."""
        self._authorize(request)
        body = await self._parse(request, TokenizeRequest)
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        info = await self.model_info()
        if body.prompt is not None:
            add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
            token_ids = self.tokenizer.encode(body.prompt, add_special_tokens)
        else:
            tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
            token_ids = self.tokenizer.chat_prompt(body.messages, body.add_generation_prompt,
                                                   bool(body.add_special_tokens), tools=tools)  # fmt: skip
        token_strs = [self.tokenizer.token_text(token) for token in token_ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(token_ids), max_model_len=info.max_model_len, tokens=token_ids,
                                token_strs=token_strs)  # fmt: skip

    @app.post("/detokenize", openapi_extra=json_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> DetokenizeResponse:
        """vLLM's `/detokenize`: token ids back to text, special tokens included."""
        self._authorize(request)
        body = await self._parse(request, DetokenizeRequest)
        self._check_model(body.model)
        self.tokenizer.check_vocabulary(body.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    @app.post("/generate", openapi_extra=json_body(GenerateRequest))
    async def generate(self, request: Request) -> Any:
        """The seed's endpoint: `{"prompt": "..."}` in, `{"generated_text": "..."}` out (greedy, no template).

        Extensions the benchmark's load generator uses: `n` (then `generated_text` is a list), `seed`,
        `ignore_eos`, `stream` (SSE deltas); the answer also carries `usage` token counts."""
        self._authorize(request)
        body = await self._parse(request, GenerateRequest)
        if not body.prompt:
            raise bad_request("Prompt is required", "prompt")
        info = await self.model_info()
        prompt_ids = self.tokenizer.completion_prompts(body.prompt)[0]
        max_tokens = body.max_tokens or self.config.generate_max_tokens
        max_tokens = min(max_tokens, info.max_model_len - len(prompt_ids))
        if max_tokens < 1:
            raise bad_request(
                f"prompt is {len(prompt_ids)} tokens; max_model_len is {info.max_model_len}", "prompt",
                code="context_length_exceeded",
            )  # fmt: skip
        if body.n > self._max_n(info):
            raise bad_request(f"n is {body.n}; at most {self._max_n(info)}", "n")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature or 0.0, n=body.n,
                                    seed=body.seed, ignore_eos=body.ignore_eos)  # fmt: skip
        except ValidationError as error:
            raise from_validation_error(error) from error
        (stream,) = await prime([self._generate(random_id("gen"), prompt_ids, params)])
        if body.stream:
            return _event_stream(_generate_events(stream, len(prompt_ids)), [stream])
        texts, num_tokens = [""] * body.n, 0
        async for output in stream:
            for completion in output.outputs:
                texts[completion.index] += completion.text
                num_tokens += len(completion.token_ids)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": num_tokens}
        return {"generated_text": texts[0] if body.n == 1 else texts, "usage": usage}

    # --- helpers ----------------------------------------------------------------------------------------------

    async def model_info(self) -> ModelInfo:
        """The replicas' engine settings (context length, block size), asked once."""
        if self._model_info is None:
            async with self._model_info_lock:
                if self._model_info is None:
                    try:
                        reported = await self.replica.model_info.remote()
                    except Exception as error:  # noqa: BLE001 — no replica yet, or it died
                        raise to_api_error(error) from error
                    self._model_info = ModelInfo.from_dict(reported)  # out of step with the replica: fail loudly
        return self._model_info

    def _generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[Any]:
        """The request's output deltas; resumed on another replica if its own is lost (router/migration.py)."""
        info = self._model_info
        hashes = prefix_block_hashes(prompt_ids, info.block_size, MAX_ROUTED_BLOCKS) if info else []

        def call(call_id: str, call_params: SamplingParams, resume: ResumeState | None) -> AsyncIterator[Any]:
            with own_request_id():
                response = self.replica_streams.generate.remote(
                    request_id=call_id, prompt_token_ids=prompt_ids, params=call_params, prefix_hashes=hashes,
                    priority=priority, resume=resume,
                )  # fmt: skip
            return replica_outputs(response)

        return migrating_outputs(request_id, params, call, self.migration, record_migration)

    def _token_text(self, as_token_ids: bool) -> Callable[[int], str]:
        """How logprobs name a token: its text, or vLLM's `token_id:N` (`return_tokens_as_token_ids`), which
        survives tokens that are not valid UTF-8 on their own."""
        return _token_id_text if as_token_ids else self.tokenizer.token_text

    def _max_n(self, info: ModelInfo) -> int:
        return min(self.config.max_n, info.max_num_seqs)

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # NOTE: compare_digest takes time independent of where the strings differ; never log the token.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")  # fmt: skip

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_id, self.config.model):
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip

    async def _parse(
        self, request: Request, schema: type[BaseModel], refused_fields: dict[str, str] | None = None
    ) -> Any:
        """The JSON body validated against `schema`; 413 over the size cap, 400 for anything malformed, or for a
        field of `refused_fields` (with its reason)."""
        media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise APIError(415, f"content type {media_type!r} is not supported: send `Content-Type: application/json`",
                           code="unsupported_media_type")  # fmt: skip
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            payload = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise bad_request(f"the body is not valid JSON: {error}", code="invalid_json") from error
        except RecursionError as error:  # hostile nesting: the parser gives up before building it
            raise bad_request("the body is nested too deeply", code="invalid_json") from error
        if not isinstance(payload, dict):
            raise bad_request("the body must be a JSON object", code="invalid_json")
        payload = refuse_known_fields(payload, refused_fields or {})
        try:
            return schema.model_validate(payload)
        except ValidationError as error:
            raise from_validation_error(error) from error
