"""Fused CPU attention backend: `paged_attention` and `write_kv_cache` as C++ ops (`kernels/csrc/`), built by
`kernels.cpu_fused_build`; `copy_blocks` is the PyTorch backend's (copy-on-write is rare and already a memcpy).

One call attends a whole mixed batch straight from the paged cache: no gather into a workspace, no padding plan,
no masks. Same contract as `torch_backend` (shapes in ../shared/DESIGN.md).
"""

from __future__ import annotations

import torch

from kernels import cpu_fused_build, torch_backend


class CpuFusedAttentionBackend:
    """The fused CPU backend as the model runner holds it: one per engine. It keeps no state between calls (each
    thread's scratch lives inside the C++ call), so two engines stepping on their own threads do not interact.

    `compile_if_missing` compiles the extension at construction when no build for this machine is cached.
    """

    name = "cpu_fused"

    def __init__(self, variant: str = "native", compile_if_missing: bool = False) -> None:
        self.ops = cpu_fused_build.load_ops(variant, compile_if_missing=compile_if_missing)
        self.simd_path: str = self.ops.simd_path()

    copy_blocks = staticmethod(torch_backend.copy_blocks)

    def write_kv_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Scatter the step's new K/V rows `[T, num_kv_heads, head_dim]` into their slots; slot -1 is skipped."""
        if key.shape[0] == 0:
            return
        _check_cpu(key_cache)
        # Rounded to the cache dtype by torch (round to nearest even), as the other backends do; a no-op for fp32.
        key, value = _row_contiguous(key.to(key_cache.dtype)), _row_contiguous(value.to(value_cache.dtype))
        self.ops.write_kv_cache(key, value, key_cache, value_cache, slot_mapping.to(torch.int64))

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
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of each new token over its sequence's cached and new K/V. Returns `[T, num_heads,
        head_dim]` in the query's dtype (computed in fp32); `out`, if given (fp32, or bf16 for a bf16 query),
        receives it and is returned."""
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1 (a token sees itself); got {sliding_window}")
        _check_cpu(query)
        # A bf16 query goes in as it is (the kernel converts as it loads and stores), unless an fp32 `out` is given.
        kernel_dtype = torch.bfloat16 if query.dtype == torch.bfloat16 else torch.float32
        if out is not None:
            kernel_dtype = out.dtype
        if kernel_dtype not in (torch.float32, query.dtype):
            raise ValueError(f"out must be float32 or the query's dtype ({query.dtype}), not {kernel_dtype}")
        kernel_query = _row_contiguous(query.to(kernel_dtype))
        result = out if out is not None else torch.empty(query.shape, dtype=kernel_dtype)
        self.ops.paged_attention(
            kernel_query,
            key_cache,
            value_cache,
            query_start_loc.to(torch.int32).contiguous(),
            seq_lens.to(torch.int32).contiguous(),
            block_tables.to(torch.int32),
            float(scale),
            sliding_window or 0,
            result,
        )
        return result if result.dtype == query.dtype else result.to(query.dtype)


def _row_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """Strided rows are fine (Q/K/V split from one projection); only head_dim must be contiguous."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _check_cpu(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cpu":
        raise RuntimeError(
            f"the cpu_fused attention backend got {tensor.device.type} tensors; on CUDA use attention_backend='triton'"
        )
