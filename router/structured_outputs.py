"""Structured-output request fields (OpenAI `response_format`, vLLM `guided_*` and `structured_outputs`) to the
engine's `StructuredOutputParams`; the engine compiles the grammar and refuses, naming the field, one that fails."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from replicas.sampling_params import StructuredOutputParams
from router.errors import bad_request
from router.protocol import ChatCompletionRequest, CompletionRequest

# vLLM's guided_* fields and the engine field each one fills.
_GUIDED = (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
           ("guided_grammar", "grammar"))  # fmt: skip


def to_structured_output(request: CompletionRequest | ChatCompletionRequest) -> StructuredOutputParams | None:
    """The request's one structured-output constraint, or None. 400 naming the field for a malformed one, or for
    more than one."""
    given: list[tuple[str, dict[str, Any]]] = []
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise bad_request(
                "response_format of type json_schema needs json_schema.schema (a JSON schema object)",
                "response_format.json_schema",
            )
        given.append(("response_format", {"json_schema": response_format.json_schema.schema_}))
    for name, field in _GUIDED:
        value = getattr(request, name)
        if value is not None:
            given.append((name, {field: value}))
    if request.structured_outputs is not None:
        spec = request.structured_outputs.model_dump(exclude_none=True)
        if "json_" in spec:
            spec["json_schema"] = spec.pop("json_")
        given.append(("structured_outputs", spec))
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(sorted({name for name, _ in given}))
        raise bad_request(f"give one structured-output constraint, not several ({names})", given[1][0])
    param, fields = given[0]
    try:
        return StructuredOutputParams(**fields, param=param)
    except ValidationError as error:
        message = error.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise bad_request(f"{param}: {message}", param) from error
