"""Every error leaves the server in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import math
from http import HTTPStatus

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from router.protocol import ErrorInfo, ErrorResponse

# OpenAI's error `type` for each status this server returns.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client gets back as an OpenAI error body, with its HTTP status (and `Retry-After` if set)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _ERROR_TYPES.get(status_code, "invalid_request_error")
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(error: ValidationError, field_prefix: str = "") -> APIError:
    """The first pydantic error as a 400 naming the offending field (`messages.0.role`, `temperature`, ...)."""
    errors = error.errors(include_url=False)
    first = errors[0]
    # A union field reports one error per member; the deepest one is from the member the input matched in shape (a
    # list of content parts with a bad part: that part, not "should be a valid string").
    first = max((e for e in errors if e["loc"][:1] == first["loc"][:1]), key=lambda e: len(e["loc"]))
    location = ".".join(str(part) for part in first["loc"] if part not in ("body",))
    # Union members add their type names to the location (`prompt.str`, `prompt.list[int]`): keep the field path.
    location = ".".join(part for part in location.split(".") if "[" not in part and part not in _TYPE_NAMES)
    param = f"{field_prefix}{location}" if location else None
    message = first["msg"]
    if param:
        message = f"{param}: {message}"
        if first["type"] == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
    return APIError(400, message, param=param, code=first["type"])


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def http_status_error(status_code: int, detail: str | None = None) -> APIError:
    """Starlette's own errors (unknown route, wrong method) in OpenAI's shape."""
    phrase = HTTPStatus(status_code).phrase if status_code in HTTPStatus._value2member_map_ else "Error"
    if status_code == 404:
        message = f"{detail or phrase}: no such route; see GET /v1/models, POST /v1/completions, /v1/chat/completions"
    else:
        message = detail or phrase
    return APIError(status_code, message)
