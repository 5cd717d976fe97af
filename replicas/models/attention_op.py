"""The paged attention step (cache write + attention) as a `torch.library` custom op, so `torch.compile` traces a
whole decoder layer around it instead of breaking the graph at the backend's Python call."""

from __future__ import annotations

import weakref

import torch

from kernels import AttentionBackend

# Live backend instances by key: a custom op takes tensors and scalars only, so a layer passes its backend's key,
# as a 0-dim tensor, so that the compiled graph does not depend on which engine runs it (one compile per process,
# the same on-disk cache entry in every process). Weak: a dropped engine's backend is not kept alive here.
_BACKENDS: weakref.WeakValueDictionary[int, AttentionBackend] = weakref.WeakValueDictionary()


def register_backend(backend: AttentionBackend) -> torch.Tensor:
    """The key compiled layers pass to `paged::attention` for this backend instance (the lowest free one)."""
    for key, known in _BACKENDS.items():
        if known is backend:
            return torch.tensor(key)
    key = next(k for k in range(len(_BACKENDS) + 1) if k not in _BACKENDS)
    _BACKENDS[key] = backend
    return torch.tensor(key)


@torch.library.custom_op("paged::attention", mutates_args=("key_cache", "value_cache"))
def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int,
    backend_key: torch.Tensor,
) -> torch.Tensor:
    """Write the step's K/V into the layer's cache, then attend; `sliding_window` 0 means none."""
    backend = _BACKENDS[int(backend_key)]
    backend.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    out = backend.paged_attention(
        query, key_cache, value_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window=sliding_window or None
    )
    return out.to(query.dtype)


@paged_attention.register_fake
def _(query, key, value, key_cache, value_cache, slot_mapping, query_start_loc, seq_lens, block_tables, scale,
      sliding_window, backend_key):  # fmt: skip
    return torch.empty_like(query, memory_format=torch.contiguous_format)
