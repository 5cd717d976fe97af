"""The replica engine: continuous batching over a paged KV cache (`replicas.deployment` wraps it for Ray Serve)."""

import os

# NOTE: OpenMP's default spin-waiting made every multi-threaded elementwise op 10-100x slower on small VMs (threads
# spin against each other and the rest of the process). It is read once, when torch loads OpenMP, so it is set
# here, before torch is imported; processes that import torch first should export it themselves.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from replicas.async_engine import AsyncEngine, EngineDeadError
from replicas.config import EngineConfig, EngineConfigError
from replicas.engine import LLMEngine, PromptTooLongError, RequestError
from replicas.llm import LLM
from replicas.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from replicas.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineConfigError",
    "EngineDeadError",
    "EngineStats",
    "LLMEngine",
    "PromptTooLongError",
    "RequestError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
