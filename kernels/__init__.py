"""Attention ops over the paged KV cache, with a Triton backend (GPU, or CPU under the interpreter) and a
PyTorch backend (CPU, and the readable reference). `load_backend` picks one."""

from __future__ import annotations

from types import ModuleType
from typing import Literal

import torch

AttentionBackendName = Literal["auto", "triton", "torch"]


def resolve_backend_name(name: AttentionBackendName, device: torch.device | str) -> str:
    """`auto` means Triton when the engine runs on CUDA, PyTorch otherwise."""
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name


def load_backend(name: AttentionBackendName, device: torch.device | str) -> ModuleType:
    """The module implementing `write_kv_cache`, `paged_attention` and `copy_blocks` for `name`."""
    resolved = resolve_backend_name(name, device)
    if resolved == "triton":
        from kernels import triton_backend

        return triton_backend
    from kernels import torch_backend

    return torch_backend
