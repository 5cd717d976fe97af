"""What both seed baselines share: the `/generate` request shape, SSE framing, a token-counting streamer, and the
`/reset` switch the benchmark flips between load levels.

The request and response shapes are the ingress's (`router/ingress.py`), so one load generator drives every
system: `{"prompt", "max_tokens", "temperature", "n", "seed", "ignore_eos", "stream"}` in;
`{"generated_text": str | list[str], "usage": {"prompt_tokens", "completion_tokens"}}` out, or with `stream`
SSE events `{"index", "text", "num_tokens"}`, then `{"usage": ...}`, then `[DONE]`.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from typing import Any

from flask import Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import TextStreamer

DEFAULT_MAX_TOKENS = 128  # the ingress's `generate_max_tokens`


class GenerateBody(BaseModel):
    """`POST /generate`, validated as the ingress validates it (extra fields ignored)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False

    @property
    def num_tokens(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def do_sample(self) -> bool:
        return bool(self.temperature)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    """An OpenAI-style error body, as router/errors.py writes them."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    response = jsonify({"error": {"message": message, "type": kind, "param": param, "code": code}})
    response.status_code = status
    return response


def parse_body(payload: Any) -> GenerateBody | Response:
    """The validated body, or the 400 to send back (same messages as the ingress)."""
    if not isinstance(payload, dict):
        return error_response(400, "the body must be a JSON object", code="invalid_json")
    try:
        body = GenerateBody.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        return error_response(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", str(first["loc"][0]))
    if not body.prompt:
        return error_response(400, "Prompt is required", "prompt")
    return body


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def json_answer(texts: list[str], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return {"generated_text": texts[0] if len(texts) == 1 else texts, "usage": usage}


class Cancelled(Exception):
    """The benchmark called `/reset`: the request was dropped before or during generation."""


class ResetEpoch:
    """A generation counter: `/reset` bumps it, and work admitted under an older epoch stops.

    NOTE: Flask cannot tell when a client has gone away, so without this a load level that ends with 127 requests
    queued in a one-at-a-time server would keep it busy for the next level's whole duration.
    """

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        return self._value

    def bump(self) -> int:
        with self._lock:
            self._value += 1
            return self._value


class CountingStreamer(TextStreamer):
    """A `generate` streamer (batch size 1) that queues `(text, num_tokens)` pieces for an SSE response.

    `TextStreamer` releases text at word boundaries; the tokens generated since the last piece travel with it, so
    the client counts tokens exactly as they arrive.
    """

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.pieces: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        self.num_tokens = 0
        self._pending_tokens = 0

    def put(self, value: Any) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self._pending_tokens += int(value.numel())
            self.num_tokens += int(value.numel())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text or (stream_end and self._pending_tokens):
            self.pieces.put((text, self._pending_tokens))
            self._pending_tokens = 0

    def close(self) -> None:
        """Marks the end of the stream (also after a failure or a reset)."""
        self.pieces.put(None)


def set_threads(num_threads: int | None) -> int:
    import torch

    threads = num_threads or max(1, len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    return threads
