"""What crosses the ingress/replica boundary, typed and torch-free: model info, routing stats, the chained block
hash, and the request outputs the replica streams back. Imported by `router/` and `replicas/` alike."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]


# --- the chained block hash (one implementation: the engine's prefix cache and the router's affinity) -----------


def hash_block_tokens(parent_hash: bytes | None, token_ids: tuple[int, ...] | list[int]) -> bytes:
    """Chained content hash of one full block. A cryptographic hash, so crafted prompts cannot collide on purpose."""
    digest = hashlib.blake2b(parent_hash or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, num_blocks: int) -> None:
    """Append to `hashes` (the chained hashes of `token_ids`' leading full blocks) up to `num_blocks` entries.

    Each block is hashed once: callers keep `hashes` and extend it as tokens arrive."""
    parent = hashes[-1] if hashes else None
    for block_index in range(len(hashes), num_blocks):
        start = block_index * block_size
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)


def prefix_block_hashes(token_ids: list[int], block_size: int, max_blocks: int) -> list[str]:
    """Hex chained hashes of the prompt's leading full blocks (at most `max_blocks`): the keys under which a
    replica's prefix cache holds them."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, block_size, min(len(token_ids) // block_size, max_blocks))
    return [block_hash.hex() for block_hash in hashes]


# --- errors the replica raises to its callers (defined here so unpickling one in the ingress loads no torch) ------


class ContractError(ValueError):
    """A record from the other side lacks a field or has one this side does not know: the two are out of step."""


class RequestRejectedError(ValueError):
    """The engine refused the request (the message says why and what it would accept): the client's error, a 400.
    `param`: the request field at fault, when the engine knows it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple:  # pickled across Serve: keep `param`
        return (type(self), (str(self), self.param))


class EngineUnavailableError(RuntimeError):
    """The replica's engine loop is gone: the replica is about to be restarted, retry on another."""


# --- a request resumed on another replica (router/migration.py) -------------------------------------------------


@dataclass(frozen=True)
class ResumeState:
    """Where a request migrated off a lost replica picks up: the output its client already has.

    The engine takes `output_token_ids` as *output* (after the prompt), so sampling continues as if uninterrupted:
    seeded streams at the same position, penalties, `min_tokens` / `max_tokens` and the grammar over all of them.
    `num_text_chars`: characters of their text already delivered; the rest (held back as a possible stop-string
    prefix) is the new replica's to send, so a stop string across the cut is still found. `sample_index`: which
    sample of an `n > 1` request this continues (each is resumed as its own one-sample request): its seeded random
    stream is that sample's, so a seeded choice goes on as it would have."""

    output_token_ids: list[int]
    num_text_chars: int
    sample_index: int = 0


# --- records the replica reports ----------------------------------------------------------------------------------


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing, unknown = required - set(data), set(data) - names
    if missing or unknown:
        raise ContractError(f"{cls.__name__}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to validate requests the way the replica's engine will."""

    model: str
    max_model_len: int
    block_size: int
    max_num_seqs: int
    num_total_blocks: int
    enable_prefix_caching: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class RoutingStats:
    """Load and recent prefix-cache contents a replica pushes to every router of its deployment.

    Serve carries it as a dict (`record_routing_stats` must return one): `to_dict` / `from_dict` at each end."""

    timestamp: float  # wall clock (time.time()) when taken: the router drops stats older than its staleness bound
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int
    block_size: int
    num_requests_finished: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    kv_slots_allocated: int  # for bench/serving.py (KV usage over a run), not for routing
    kv_slots_live: int
    num_generation_tokens: int
    num_preemptions: int
    pid: int
    prefix_hashes: list[str] = field(default_factory=list)  # hex, most recently registered last
    prefill_seconds_per_token: float = 0.0  # the engine's measured prefill cost; 0.0 when not measured yet
    kv_transfer_address: str | None = None  # where other replicas fetch its cached prefixes (replicas/kv_transfer.py)
    num_imported_tokens: int = 0  # prefix tokens it took from other replicas

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingStats:
        return _from_dict(cls, data)


# --- request outputs (the shapes vLLM users know) -------------------------------------------------------------


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob of a sampled token and of the most likely alternatives at that position."""

    token_id: int
    logprob: float
    rank: int
    top: dict[int, float]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """When a request passed each stage (monotonic seconds), as vLLM's `RequestOutput.metrics`; None: not yet.

    Taken from the request's first sequence. The replica turns them into queue time, time to first token,
    inter-token and end-to-end latency (`replicas/metrics.py`).
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None  # at the end of a request: when its last token was sampled


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    error: str | None = None  # why the request was failed, when the engine failed it
    metrics: RequestMetrics | None = None
    # With `SamplingParams.prompt_logprobs`: per prompt token, its logprob, rank and top alternatives; the first
    # token's is None (nothing precedes it). Delta outputs carry them once, in the first output.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    error_status: int = 500  # with `error`: 400 when the request itself made it fail (its grammar cannot go on)


def merge_deltas(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive delta outputs of one request as one (a consumer that fell behind gets one message, not many).

    Completions are matched by index; text, tokens and logprobs concatenate; finish state, timings and the
    cumulative logprob come from the later one; prompt logprobs (sent once) from whichever carries them."""
    completions = {completion.index: completion for completion in earlier.outputs}
    for completion in later.outputs:
        previous = completions.get(completion.index)
        if previous is None:
            completions[completion.index] = completion
            continue
        logprobs = None
        if previous.logprobs is not None or completion.logprobs is not None:
            logprobs = (previous.logprobs or []) + (completion.logprobs or [])
        completions[completion.index] = CompletionOutput(
            completion.index, previous.text + completion.text, previous.token_ids + completion.token_ids,
            completion.finish_reason, completion.stop_reason, logprobs, completion.cumulative_logprob,
        )  # fmt: skip
    return RequestOutput(
        later.request_id, later.prompt, later.prompt_token_ids or earlier.prompt_token_ids,
        sorted(completions.values(), key=lambda completion: completion.index), later.finished,
        max(earlier.num_cached_tokens, later.num_cached_tokens), later.error or earlier.error, later.metrics,
        earlier.prompt_logprobs if earlier.prompt_logprobs is not None else later.prompt_logprobs,
        error_status=later.error_status if later.error else earlier.error_status,
    )  # fmt: skip
