"""Attention ops over the paged KV cache, with a Triton backend (GPU, or CPU under the interpreter), a fused C++
CPU backend (`cpu_fused`, built at set-up) and a PyTorch backend (CPU fallback, and the readable reference).
`load_backend` makes the instance a model runner owns."""

from __future__ import annotations

import logging
from typing import Literal, Protocol

import torch

logger = logging.getLogger(__name__)

AttentionBackendName = Literal["auto", "triton", "torch", "cpu_fused"]


class AttentionBackend(Protocol):
    """The three ops a model runner calls. An instance owns whatever state its calls share (plan caches,
    workspaces), so each engine gets its own from `load_backend`."""

    name: str

    def write_kv_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor: ...

    def copy_blocks(
        self, key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
    ) -> None: ...


_warned_fallback = False


def resolve_backend_name(name: AttentionBackendName, device: torch.device | str) -> str:
    """`auto` means Triton when the engine runs on CUDA, else the fused CPU kernel when its build for this machine is
    cached (`make setup` makes it), else PyTorch."""
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "triton"
    from kernels import cpu_fused_build

    return "cpu_fused" if cpu_fused_build.is_built() else "torch"


def load_backend(name: AttentionBackendName, device: torch.device | str) -> AttentionBackend:
    """A new backend instance for `name` (resolved for `device`); one per engine, never shared.

    NOTE: `auto` never compiles: it takes `cpu_fused` only when a matching build is cached, and falls back to
    PyTorch (with one warning per process) when there is none or it fails to load, so an engine starts in seconds
    whatever the machine. `cpu_fused` asked for by name compiles on first use (about 20-40 s, logged).
    """
    resolved = resolve_backend_name(name, device)
    # NOTE: imported on demand: triton is slow to import, and must see TRITON_INTERPRET before it first loads.
    if resolved == "triton":
        from kernels.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if resolved == "cpu_fused" or (name == "auto" and torch.device(device).type == "cpu"):
        from kernels.cpu_fused_backend import CpuFusedAttentionBackend
        from kernels.cpu_fused_build import CpuFusedBuildError

        if torch.device(device).type != "cpu":
            raise ValueError(f"attention_backend='cpu_fused' runs on CPU, not {device}; use 'triton' or 'auto'")
        try:
            return CpuFusedAttentionBackend(compile_if_missing=name == "cpu_fused")
        except CpuFusedBuildError as error:
            if name == "cpu_fused":
                raise
            _warn_fallback(str(error))
    from kernels.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


def _warn_fallback(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        logger.warning("attention_backend=auto: using the PyTorch backend on CPU (%s)", reason)
