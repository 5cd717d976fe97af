"""The replica engine: continuous batching over a paged KV cache (`replicas.deployment` wraps it for Ray Serve)."""

from replicas.async_engine import AsyncEngine, EngineDeadError
from replicas.config import EngineConfig, EngineConfigError
from replicas.engine import LLMEngine, PromptTooLongError, RequestError
from replicas.llm import LLM
from replicas.outputs import CompletionOutput, EngineStats, RequestOutput
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
    "RequestOutput",
    "SamplingParams",
]
