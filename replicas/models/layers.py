"""Building blocks shared by the model families: attention over the paged KV cache, norms, rotary embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import AttentionBackend
from replicas.models import attention_op

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class AttentionMetadata:
    """The flattened step, as the attention contract in DESIGN.md describes it."""

    slot_mapping: torch.Tensor  # int64 [T]
    query_start_loc: torch.Tensor  # int32 [S + 1]
    seq_lens: torch.Tensor  # int32 [S]
    block_tables: torch.Tensor  # int32 [S, max_blocks]


class PagedAttention(nn.Module):
    """Writes the step's K/V into this layer's cache, then attends over each sequence's cached context.

    With `sliding_window` W, the token at position q sees keys at positions q - W < k <= q (transformers' masking).
    NOTE: the block manager still keeps every block of a sequence; blocks that fell out of the window are not freed.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1 (a token sees itself); got {sliding_window}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window = sliding_window
        self.backend: AttentionBackend | None = None
        self.backend_key = torch.tensor(0)  # the backend's key for the `paged::attention` op (compiled forwards)
        self.key_cache = torch.empty(0)
        self.value_cache = torch.empty(0)

    def bind(self, backend: AttentionBackend, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        self.backend, self.key_cache, self.value_cache = backend, key_cache, value_cache
        self.backend_key = attention_op.register_backend(backend)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        assert self.backend is not None, "the model runner binds the KV cache before the first step"
        if torch.compiler.is_compiling():
            # One opaque op for dynamo (the backend is Python the graph cannot hold); eager calls skip its dispatch.
            return torch.ops.paged.attention(
                query, key, value, self.key_cache, self.value_cache, metadata.slot_mapping, metadata.query_start_loc,
                metadata.seq_lens, metadata.block_tables, self.scale, self.sliding_window or 0, self.backend_key,
            )  # fmt: skip
        self.backend.write_kv_cache(key, value, self.key_cache, self.value_cache, metadata.slot_mapping)
        return self.backend.paged_attention(
            query,
            self.key_cache,
            self.value_cache,
            metadata.query_start_loc,
            metadata.seq_lens,
            metadata.block_tables,
            self.scale,
            sliding_window=self.sliding_window,
        )


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.cpu_ops: Any = None  # the fused CPU extension's ops (`bind_cpu_ops`); None: eager ATen ops

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        ops = fused_cpu_ops(self.cpu_ops, hidden, self.weight)
        if ops is not None:
            out = torch.empty_like(hidden)
            ops.rms_norm(hidden, self.weight, self.eps, out)
            return out
        # Same operation order as transformers, so greedy outputs match token for token.
        dtype = hidden.dtype
        hidden = hidden.float()
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.eps)
        return self.weight * hidden.to(dtype)

    def add_and_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(residual + hidden), residual + hidden)`: the residual stream's add and the next norm in one pass
        (the fused op updates `residual` in place)."""
        ops = fused_cpu_ops(self.cpu_ops, hidden, residual, self.weight)
        if ops is None:
            residual = residual + hidden
            return self(residual), residual
        out = torch.empty_like(hidden)
        ops.add_rms_norm(hidden, residual, self.weight, self.eps, out)
        return out, residual


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention), with cos/sin tables for every position up front."""

    def __init__(self, hf_config: object, head_dim: int, max_position: int) -> None:
        super().__init__()
        rope_parameters = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = rope_parameters.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if rope_type == "default":
            base = rope_parameters.get("rope_theta", 10000.0)
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
        positions = torch.arange(max_position, dtype=torch.float)
        freqs = positions[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cache = nn.Buffer(emb.cos() * scaling, persistent=False)
        self.sin_cache = nn.Buffer(emb.sin() * scaling, persistent=False)
        # (positions, dtype, cos rows, sin rows) of the latest step: every layer shares this module and gets the
        # same positions tensor, so the rows are gathered once per step, not once per layer (~1% of a decode step).
        self._rows: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None
        self.cpu_ops: Any = None  # see RMSNorm

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin(positions, query.dtype)
        ops = fused_cpu_ops(self.cpu_ops, query, key)
        if ops is not None:  # in place: query and key are views of this step's fresh q/k/v projection
            ops.rotary(query, key, cos[:, 0], sin[:, 0])
            return query, key
        return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # A compiled layer gathers them itself: no Python state in the graph.
        compiling = torch.compiler.is_compiling()
        rows = self._rows
        if not compiling and rows is not None and rows[0] is positions and rows[1] == dtype:
            return rows[2], rows[3]
        cos = self.cos_cache[positions].to(dtype)[:, None, :]
        sin = self.sin_cache[positions].to(dtype)[:, None, :]
        if not compiling:
            self._rows = (positions, dtype, cos, sin)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_and_mul(gate_up: torch.Tensor, cpu_ops: Any = None) -> torch.Tensor:
    ops = fused_cpu_ops(cpu_ops, gate_up)
    if ops is not None:
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        ops.silu_and_mul(gate_up, out)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


_FUSED_CPU_DTYPES = (torch.float32, torch.bfloat16)


def fused_cpu_ops(ops: Any, *tensors: torch.Tensor) -> Any:
    """`ops` if its fused kernels take these tensors (CPU, fp32 or bf16, rows contiguous), else None (eager ATen).
    Never under `torch.compile`: Inductor fuses the eager chain itself."""
    if ops is None or torch.compiler.is_compiling():
        return None
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.dtype not in _FUSED_CPU_DTYPES or tensor.stride(-1) != 1:
            return None
    return ops


def bind_cpu_ops(model: nn.Module, ops: Any) -> int:
    """Point the model's norms, rotary embeddings and MLPs at the fused CPU extension's ops (None: back to eager
    ATen); returns how many modules take them."""
    bound = 0
    for module in model.modules():
        if hasattr(module, "cpu_ops"):
            module.cpu_ops = ops
            bound += 1
    return bound


class CheckpointParams:
    """A model's parameters by name while a checkpoint loads: an unexpected or a missing weight is an error."""

    def __init__(self, model: nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.loaded: set[str] = set()

    def __getitem__(self, name: str) -> nn.Parameter:
        """The parameter the checkpoint tensor `name` loads into, marked as loaded."""
        if name not in self.params:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        self.loaded.add(name)
        return self.params[name]

    def check_all_loaded(self) -> None:
        missing = set(self.params) - self.loaded
        if missing:
            raise ValueError(f"weights missing from checkpoint: {sorted(missing)[:5]}")
