"""Per-request sampling parameters (the vLLM/OpenAI surface), validated when the request enters."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20


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
