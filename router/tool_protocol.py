"""OpenAI's tool-calling schemas: the `tools` and `tool_choice` request fields, the tool calls an assistant message
carries (in a request's history and in a response), and their streamed deltas."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

# OpenAI's rule for function names; the name also has to survive a chat template and a JSON string unescaped.
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDefinition(_Request):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="JSON schema of the arguments object")
    strict: bool | None = None  # accepted; required/named calls are always grammar-constrained here


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """`{"type": "function", "function": {"name": ...}}`: the model must call this function."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallRequest(_Request):
    name: str
    arguments: str = Field(description="a JSON object, as a string (what a response's tool call carried)")

    @field_validator("arguments")
    @classmethod
    def _arguments_are_a_json_object(cls, arguments: str) -> str:
        # NOTE: chat templates render the arguments as an object (`arguments | tojson`), so they are parsed here;
        # a string that is not a JSON object would render as a quoted string, which no model was trained on.
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ValueError(f"arguments must be a JSON object encoded as a string: {error}") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object encoded as a string")
        return arguments


class ToolCallRequest(_Request):
    """A tool call of an earlier assistant message, sent back in the conversation."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallRequest


# --- responses ---------------------------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _WithoutNulls(BaseModel):
    """Streamed deltas leave out fields they do not set, as OpenAI's do: a client accumulating them by key (the
    OpenAI SDK) then never sees a `null` where an earlier delta gave a value."""

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_WithoutNulls):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_WithoutNulls):
    """The first delta of a call carries `index`, `id`, `type` and `function.name` (and the arguments so far);
    the later ones `index` and a piece of `function.arguments`."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None
