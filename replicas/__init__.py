"""The replica engine: continuous batching over a paged KV cache (`replicas.deployment` wraps it for Ray Serve).

Names load on first use, so `replicas.contract` and `replicas.sampling_params` import without torch (the
ingress process never loads it).
"""

import importlib
import os
from typing import Any

# NOTE: OpenMP's default spin-waiting made every multi-threaded elementwise op 10-100x slower on small VMs (threads
# spin against each other and the rest of the process). It is read once, when torch loads OpenMP, so it is set
# here, before torch is imported; processes that import torch first should export it themselves.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
