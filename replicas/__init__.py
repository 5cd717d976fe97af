"""The replica engine: continuous batching over a paged KV cache (`replicas.deployment` wraps it for Ray Serve).

Names load on first use, so `replicas.contract` and `replicas.sampling_params` import without torch (the
ingress process never loads it).
"""

import importlib
import os
from typing import Any

# NOTE: OpenMP (libgomp, torch's) reads these once, when torch loads it, so they are set here, before torch is
# imported; processes that import torch first should import this package before it or export them. Workers that
# spin-wait long (libgomp's default, or ACTIVE) made multi-threaded ops 10-100x slower on small VMs shared with
# other busy processes; workers that sleep at once (PASSIVE alone) take ~100 us to wake, and a decode step runs ~300
# parallel regions (GEMMs, norms, elementwise ops) back to back: a batch-64 step of the default model took 489 ms
# instead of 281 ms here (`bench.offline --profile`). So: sleep, after spinning ~1 ms (30,000 spins) for the next.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000"}
for _name, _value in OPENMP_ENV.items():
    os.environ.setdefault(_name, _value)

_EXPORTS = {
    "LLM": "replicas.llm",
    "AsyncEngine": "replicas.async_engine",
    "EngineDeadError": "replicas.async_engine",
    "EngineConfig": "replicas.config",
    "EngineConfigError": "replicas.config",
    "LLMEngine": "replicas.engine",
    "RequestError": "replicas.intake",
    "PromptTooLongError": "replicas.intake",
    "EngineStats": "replicas.outputs",
    "CompletionOutput": "replicas.contract",
    "RequestMetrics": "replicas.contract",
    "RequestOutput": "replicas.contract",
    "SamplingParams": "replicas.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'replicas' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
