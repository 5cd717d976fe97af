"""Per-request sampling parameters (the vLLM/OpenAI surface), validated when the request enters."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20


class StructuredOutputParams(BaseModel):
    """Constrain the output to a grammar (vLLM's `guided_decoding`): exactly one of a JSON schema, any JSON object,
    a regular expression, a list of choices, or an EBNF grammar (xgrammar's dialect, GBNF-like)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: str | None = Field(default=None, description="JSON schema, as JSON text (a dict is serialized)")
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    param: str = Field(default="structured_output", description="the request field it came from, for errors")

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_as_text(cls, schema: Any) -> Any:
        if isinstance(schema, (dict, bool)):
            return json.dumps(schema)
        if isinstance(schema, str):
            try:
                parsed = json.loads(schema)
            except json.JSONDecodeError as error:
                raise ValueError(f"the JSON schema is not valid JSON: {error}") from error
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
        return schema

    @field_validator("choice")
    @classmethod
    def _choices_not_empty(cls, choice: list[str] | None) -> list[str] | None:
        if choice is not None and (not choice or any(c == "" for c in choice)):
            raise ValueError("choice needs at least one non-empty string")
        return choice

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputParams":
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"give exactly one of json_schema, json_object, regex, choice, grammar (got {given})")
        return self

    def key(self) -> tuple[str, str]:
        """(kind, spec text): what the compiled grammar is cached by."""
        if self.json_schema is not None:
            return ("json", self.json_schema)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        if self.choice is not None:
            return ("choice", json.dumps(self.choice))
        return ("grammar", self.grammar or "")


class SamplingParams(BaseModel):
    """How to pick each next token and when to stop. Defaults are greedy-free sampling at temperature 1, like vLLM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(default=1, ge=1, le=128, description="completions returned for the prompt")
    best_of: int | None = Field(default=None, ge=1, le=128, description="samples drawn; the n best are returned")
    max_tokens: int | None = Field(default=16, ge=1, description="None: up to the model's context length")
    min_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="0 or -1: off")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token")
    prompt_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="top alternatives per prompt token (0: its own logprob only)"
    )
    logit_bias: dict[int, float] = Field(default_factory=dict, description="added to the token's logit (OpenAI)")
    skip_special_tokens: bool = True
    structured_output: StructuredOutputParams | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: str | list[str] | None) -> list[str]:
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, logit_bias: dict[int, float]) -> dict[int, float]:
        if len(logit_bias) > 300:
            raise ValueError(f"logit_bias has {len(logit_bias)} entries; at most 300 are accepted")
        for token_id, bias in logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {token_id} is {bias}; it must be within [-100, 100]")
        return logit_bias

    @model_validator(mode="after")
    def _check_best_of(self) -> "SamplingParams":
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.temperature == 0.0 and self.num_samples > 1 and self.best_of not in (None, self.n):
            raise ValueError("best_of > n needs temperature > 0 (greedy samples are all identical)")
        return self

    @property
    def num_samples(self) -> int:
        """Sequences drawn for this request: `best_of` when given, else `n`."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
