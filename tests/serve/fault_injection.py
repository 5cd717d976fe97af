"""An `LLMReplica` for fault tests: its engine fails any step that computes a request whose prompt starts with
`POISON_PROMPT`, as a bug or a bad kernel input would; a request whose prompt starts with `DYING_PROMPT` gets
`DYING_AFTER_OUTPUTS` deltas and then the error of a dead engine loop, as if its replica died under it (on every
replica, so migration never saves it); `DYING_ONCE_PROMPT` the same on a request's first call only. While
`refuse_start_flag(app)` exists, the app's replicas fail to start, so Serve cannot replace one that died (every
replica gone). Otherwise it is the production replica, unchanged.

Imported by Ray workers by module path (the test cluster's PYTHONPATH is the repository root).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from replicas.contract import EngineUnavailableError, RequestOutput
from replicas.deployment import LLMReplica

# Token ids no other test sends at the start of a prompt.
POISON_PROMPT = [31337, 27182, 31415, 16180]
INJECTED_FAULT_MESSAGE = "injected fault"
DYING_PROMPT = [27182, 31337, 16180, 31415]
DYING_AFTER_OUTPUTS = 2
# The same death, on a request's first call only (not on its resumed ones: their ids carry `-m`): migration saves it.
DYING_ONCE_PROMPT = [16180, 31415, 27182, 31337]
# Calls for `DYING_PROMPT` requests this process's replica got, resumed ones included. NOTE: a module global, not
# a replica method: Serve's actor exposes only its own methods; tests read it with `dying_calls_in_process`.
_DYING_CALLS = [0]


def dying_calls_in_process(_actor: Any = None) -> int:
    """Run in a replica's process by `actor.__ray_call__`."""
    return _DYING_CALLS[0]


def refuse_start_flag(app_name: str) -> Path:
    """A file in the Ray session's directory (shared by the driver and the replicas of one cluster, on one machine):
    while it exists, `app_name`'s fault-injecting replicas refuse to start."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / f"refuse-start-{app_name}"


class _FaultInjectingReplica(LLMReplica.func_or_class):  # type: ignore[misc, name-defined]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from ray import serve

        if refuse_start_flag(serve.get_replica_context().app_name).exists():
            raise RuntimeError("injected fault: this replica refuses to start")
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
        dying = prompt_token_ids[: len(DYING_PROMPT)] == DYING_PROMPT or (
            prompt_token_ids[: len(DYING_ONCE_PROMPT)] == DYING_ONCE_PROMPT and "-m" not in request_id
        )
        _DYING_CALLS[0] += dying
        num_outputs = 0
        async for output in super().generate(request_id, prompt_token_ids, *args, **kwargs):
            yield output
            num_outputs += 1
            if dying and num_outputs >= DYING_AFTER_OUTPUTS and not output.finished:
                raise EngineUnavailableError("engine loop is not running: injected death")


FaultInjectingReplica = LLMReplica.options(func_or_class=_FaultInjectingReplica)
