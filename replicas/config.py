"""Engine configuration, validated once at the edge."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# NOTE: the same Literal as `kernels.AttentionBackendName`, spelt out so this module (which the Serve driver and
# `router.app` import to validate configs) loads no torch.
AttentionBackendName = Literal["auto", "triton", "torch", "cpu_fused"]


class EngineConfigError(ValueError):
    """The engine cannot start with this configuration; the message says what to change."""


class EngineConfig(BaseModel):
    """Everything an `LLMEngine` needs to start. Fields that depend on the model or the machine may be `None`
    and are resolved when the engine starts (`max_model_len` from the model config, threads from the CPUs given)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    model: str = Field(description="Local directory in Hugging Face format (config.json, safetensors, tokenizer)")
    tokenizer: str | None = Field(default=None, description="Tokenizer directory; defaults to `model`")
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="auto: the model's dtype. A 16-bit cache under a float32 model halves KV memory and attention "
        "bandwidth (the cpu_fused kernel converts as it reads; outputs then differ slightly from transformers)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    block_size: int = Field(default=16, ge=1, le=256)
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0, description="KV cache budget in bytes")
    kv_cache_memory_fraction: float = Field(
        default=0.85, gt=0.0, le=1.0, description="GPU only: fraction of free memory after weights used for KV"
    )
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    scheduling_policy: Literal["fcfs", "priority", "fair"] = Field(
        default="fcfs",
        description="fcfs: arrival order; priority: lower `priority` first, then arrival; fair: priority, then "
        "short prompts before long ones, and no prompt prefills more than `long_prefill_token_threshold` per step",
    )
    long_prefill_token_threshold: int = Field(
        default=256, ge=1, description="fair policy: prompts longer than this are long; their per-step chunk cap"
    )
    max_model_len: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True
    attention_backend: AttentionBackendName = "auto"
    kv_allocation: Literal["paged", "contiguous"] = Field(
        default="paged",
        description="`contiguous` reserves max_model_len slots per sequence at admission (the traditional scheme; "
        "for benchmarks that isolate the gain of paging)",
    )
    prepack_weights: bool = Field(
        default=True,
        description="CPU, eager: Linear weights reordered once at load into a packed layout, float32 for MKL's packed "
        "sgemm (decode GEMMs 1.35x oneDNN's packing and 1.3x MKL on the plain layout at 64 rows here), bfloat16 "
        "for oneDNN (rows padded to a bounded set: oneDNN keeps a primitive per distinct row count) (README)",
    )
    compile: bool = Field(
        default=False,
        description="CPU: torch.compile the decoder layers (Inductor C++; fused elementwise ops), compiled at "
        "start-up and cached on disk. Opt-in: on this project's 2-vCPU machine it measured within noise of eager "
        "(README), outputs may differ from eager at near-ties, and a cold start compiles for ~30 s",
    )
    seed: int = 0
    num_threads: int | None = Field(default=None, ge=1, description="torch threads; default: the CPUs given")
    max_stop_strings: int = Field(default=16, ge=0)
    max_structured_output_bytes: int = Field(
        default=65536, ge=1, description="largest JSON schema, regex, choice list or grammar a request may give"
    )
    structured_output_compile_threads: int = Field(default=1, ge=1, description="threads compiling grammars")
    structured_output_cache_size: int = Field(default=256, ge=1, description="compiled grammars kept (LRU)")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, block_size: int) -> int:
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        return block_size

    @field_validator("model")
    @classmethod
    def _model_dir_exists(cls, model: str) -> str:
        path = Path(model)
        if not path.is_dir():
            raise ValueError(f"model directory {model!r} does not exist (models load from local HF directories)")
        if not (path / "config.json").exists():
            raise ValueError(f"{model!r} has no config.json: not a Hugging Face model directory")
        return model

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise EngineConfigError("device='cuda' but CUDA is not available on this machine")
        return self.device

    def resolved_num_threads(self) -> int:
        if self.num_threads is not None:
            return self.num_threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
