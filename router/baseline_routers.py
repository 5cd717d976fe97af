"""Routers the routing benchmark (bench/routing.py) compares ours with; chosen with `AppArgs.request_router`.

- `RoundRobinRequestRouter`: each replica in turn, blind to load and prefixes (the floor).
- `TokenPrefixCacheAffinityRouter`: Ray Serve LLM's `PrefixCacheAffinityRouter`, fed our requests. It matches the
  text of `prompt` (or `messages`) of the first positional argument that has one; our ingress calls
  `LLMReplica.generate` with keywords only (`prompt_token_ids=...`), so this subclass hands it a stand-in argument
  whose `prompt` is the token ids spelt one character per token (`chr(0xE000 + id)`: never a surrogate). A prefix
  of characters is then exactly a prefix of tokens, so its match rate is the token match rate.
  (Imported from where `ray.serve.llm.request_router` re-exports it: importing `ray.serve.llm` itself requires
  vLLM or SGLang, which this project does not install.)
"""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace
from typing import Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

_PRIVATE_USE = 0xE000  # above the surrogates: every token id maps to one valid character


def token_text(token_ids: list[int]) -> str:
    """One character per token, so text prefixes are token prefixes."""
    return "".join(chr(_PRIVATE_USE + token_id) for token_id in token_ids)


def with_prompt_arg(pending_request: PendingRequest | None) -> PendingRequest | None:
    """The request as Ray Serve LLM's routers read it: a positional argument with a `prompt`."""
    if pending_request is None or pending_request.args or "prompt_token_ids" not in pending_request.kwargs:
        return pending_request
    prompt = token_text(list(pending_request.kwargs["prompt_token_ids"]))
    return dataclasses.replace(pending_request, args=[SimpleNamespace(prompt=prompt)])


class TokenPrefixCacheAffinityRouter(PrefixCacheAffinityRouter):
    """`PrefixCacheAffinityRouter` over the token ids our ingress sends (see the module docstring)."""

    async def _prefix_match_best_replicas(
        self, pending_request: PendingRequest | None, candidate_replicas: list[RunningReplica]
    ) -> list[list[RunningReplica]]:
        return await super()._prefix_match_best_replicas(with_prompt_arg(pending_request), candidate_replicas)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        super().on_request_routed(with_prompt_arg(pending_request), replica_id, result)


class RoundRobinRequestRouter(RequestRouter):
    """Every replica in turn (Ray has none); one that refuses is skipped for the next in the same turn."""

    def initialize_state(self) -> None:
        self._turn = itertools.count()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda replica: replica.replica_id.unique_id)
        start = next(self._turn) % len(ordered)
        return [[replica] for replica in ordered[start:] + ordered[:start]]
