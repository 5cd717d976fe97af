"""An `LLMReplica` for fault tests: its engine fails any step that computes a request whose prompt starts with
`POISON_PROMPT`, as a bug or a bad kernel input would. Otherwise it is the production replica, unchanged.

Imported by Ray workers by module path (the test cluster's PYTHONPATH is the repository root).
"""

from __future__ import annotations

from typing import Any

from replicas.deployment import LLMReplica

# Token ids no other test sends at the start of a prompt.
POISON_PROMPT = [31337, 27182, 31415, 16180]
INJECTED_FAULT_MESSAGE = "injected fault"


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


FaultInjectingReplica = LLMReplica.options(func_or_class=_FaultInjectingReplica)
