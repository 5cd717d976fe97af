"""An `LLMReplica` for fault tests: its engine fails any step that computes a request whose prompt starts with
`POISON_PROMPT`, as a bug or a bad kernel input would; a request whose prompt starts with `DYING_PROMPT` gets
`DYING_AFTER_OUTPUTS` deltas and then the error of a dead engine loop, as if its replica died under it (on every
replica, so migration never saves it). Otherwise it is the production replica, unchanged.

Imported by Ray workers by module path (the test cluster's PYTHONPATH is the repository root).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from replicas.contract import EngineUnavailableError, RequestOutput
from replicas.deployment import LLMReplica

# Token ids no other test sends at the start of a prompt.
POISON_PROMPT = [31337, 27182, 31415, 16180]
INJECTED_FAULT_MESSAGE = "injected fault"
DYING_PROMPT = [27182, 31337, 16180, 31415]
DYING_AFTER_OUTPUTS = 2
# Calls for `DYING_PROMPT` requests this process's replica got, resumed ones included. NOTE: a module global, not
# a replica method: Serve's actor exposes only its own methods; tests read it with `dying_calls_in_process`.
_DYING_CALLS = [0]


def dying_calls_in_process(_actor: Any = None) -> int:
    """Run in a replica's process by `actor.__ray_call__`."""
    return _DYING_CALLS[0]


class _FaultInjectingReplica(LLMReplica.func_or_class):  # type: ignore[misc, name-defined]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        runner = self.engine.engine.model_runner
        execute = runner.execute

        def execute_unless_poisoned(scheduled: Any) -> Any:
            if any(item.seq.token_ids[: len(POISON_PROMPT)] == POISON_PROMPT for item in scheduled.scheduled):
                raise RuntimeError(INJECTED_FAULT_MESSAGE)
            return execute(scheduled)

        # NOTE: the engine thread looks the method up on every step, so this takes effect from the next one.
        runner.execute = execute_unless_poisoned

    async def generate(self, request_id: str, prompt_token_ids: list[int], *args: Any,
                       **kwargs: Any) -> AsyncIterator[RequestOutput]:  # fmt: skip
        dying = prompt_token_ids[: len(DYING_PROMPT)] == DYING_PROMPT
        _DYING_CALLS[0] += dying
        num_outputs = 0
        async for output in super().generate(request_id, prompt_token_ids, *args, **kwargs):
            yield output
            num_outputs += 1
            if dying and num_outputs >= DYING_AFTER_OUTPUTS and not output.finished:
                raise EngineUnavailableError("engine loop is not running: injected death")


FaultInjectingReplica = LLMReplica.options(func_or_class=_FaultInjectingReplica)
