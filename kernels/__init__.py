"""Attention ops over the paged KV cache, with a Triton backend (GPU, or CPU under the interpreter) and a
PyTorch backend (CPU, and the readable reference). `load_backend` makes the instance a model runner owns."""

from __future__ import annotations

from typing import Literal, Protocol

import torch

AttentionBackendName = Literal["auto", "triton", "torch"]


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


def resolve_backend_name(name: AttentionBackendName, device: torch.device | str) -> str:
    """`auto` means Triton when the engine runs on CUDA, PyTorch otherwise."""
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name


def load_backend(name: AttentionBackendName, device: torch.device | str) -> AttentionBackend:
    """A new backend instance for `name` (resolved for `device`); one per engine, never shared."""
    resolved = resolve_backend_name(name, device)
    # NOTE: imported on demand: triton is slow to import, and must see TRITON_INTERPRET before it first loads.
    if resolved == "triton":
        from kernels.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from kernels.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
