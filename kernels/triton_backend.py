"""Triton attention backend: the same `write_kv_cache`, `paged_attention` and `copy_blocks` as `torch_backend`.

`TritonAttentionBackend` is what the model runner holds; the module functions are the ops themselves.

Runs compiled on CUDA, and on CPU tensors in Triton's interpreter (slow; for tests). Shapes and semantics follow
../shared/DESIGN.md. `paged_attention` is one launch for a whole mixed batch (prefill chunks, prefix-cache hits,
decodes); decode-only batches over long contexts may instead take the split-K (flash-decoding) path, two launches.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from triton.runtime.interpreter import InterpretedFunction

from kernels.triton_paged_attention import paged_attention_kernel, reduce_segments_kernel

# Split-K heuristic (see `choose_num_segments`). Untuned defaults: revisit with bench/kernels.py on the target GPU.
SPLIT_K_MIN_CONTEXT = 1024  # shorter contexts finish in one pass before a second launch would pay off
SPLIT_K_MIN_SEGMENT = 256  # keys per segment, so each program still streams a few tiles
SPLIT_K_MAX_SEGMENTS = 16

# Kernels decorated while TRITON_INTERPRET=1 run on CPU tensors in Triton's interpreter.
INTERPRETED = isinstance(paged_attention_kernel, InterpretedFunction)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter the step's new K/V rows `[T, num_kv_heads, head_dim]` into their slots; slot -1 is skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _check_device(key_cache)
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    _check_cache(key_cache, value_cache)
    _write_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        BLOCK_SIZE=key_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads,
        NUM_KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """Copy whole blocks `block_mapping[i, 0] -> block_mapping[i, 1]` in every layer (copy-on-write).

    No block may be both a source and a destination in one call (copies run in parallel).
    """
    num_pairs = block_mapping.shape[0]
    if num_pairs == 0:
        return
    _check_device(key_caches[0])
    block_mapping = block_mapping.to(device=key_caches[0].device).contiguous()
    copy_block = 1024
    # NOTE: one launch per layer: the caches are separate tensors, and a table of raw pointers would need
    # integer-to-pointer casts the interpreter cannot run. Copy-on-write is rare, so the launches do not matter.
    for key_cache, value_cache in zip(key_caches, value_caches):
        _check_cache(key_cache, value_cache)
        if not (key_cache[0].is_contiguous() and value_cache[0].is_contiguous()):
            raise ValueError("copy_blocks needs each cache block to be contiguous")
        block_numel = key_cache[0].numel()
        grid = (num_pairs, triton.cdiv(block_numel, copy_block))
        _copy_blocks_kernel[grid](
            key_cache,
            value_cache,
            block_mapping,
            key_cache.stride(0),
            value_cache.stride(0),
            block_numel,
            BLOCK=copy_block,
        )


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    split_k: bool | None = None,
    num_segments: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each new token over its sequence's cached and new K/V. Returns `[T, num_heads, head_dim]`.

    `split_k` forces the split-K path on (True) or off (False); None lets `choose_num_segments` decide.
    `num_segments` overrides how many segments split-K uses. `out`, if given, receives the result and is returned.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    num_seqs = seq_lens.shape[0]
    if cache_head_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"query is [T, {num_heads}, {head_dim}] but the cache holds {num_kv_heads} KV heads of {cache_head_dim}; "
            "num_heads must be a multiple of num_kv_heads and head dims must match"
        )
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    elif out.shape != query.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(query.shape)} with a contiguous last dim; got {tuple(out.shape)}")
    if num_tokens == 0:
        return out
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1 (a token sees itself); got {sliding_window}")
    _check_device(query)
    query = _last_dim_contiguous(query)
    _check_cache(key_cache, value_cache)
    group = num_heads // num_kv_heads
    # NOTE: every sequence in a step has at least one new token, so T == S means every q_len is 1: a decode-only
    # batch is recognised without reading query_start_loc on the host (no device sync).
    decode_only = num_tokens == num_seqs
    block_m, block_q, block_n = _tile_shape(decode_only, group, head_dim, key_cache.element_size())
    head_dim_pad = triton.next_power_of_2(head_dim)
    # The padded block table bounds every seq_len, again without a sync.
    max_context = block_tables.shape[1] * block_size
    if split_k is None:
        segments = num_segments or choose_num_segments(
            num_seqs, num_kv_heads, max_context, decode_only, _num_sms(query.device)
        )
        split_k = segments > 1
    elif split_k:
        segments = num_segments or max(2, min(SPLIT_K_MAX_SEGMENTS, max_context // SPLIT_K_MIN_SEGMENT))
    else:
        segments = 1

    if split_k:
        partial_max = torch.empty((num_tokens, num_heads, segments), dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
        partial_acc = torch.empty((num_tokens, num_heads, segments, head_dim), dtype=torch.float32, device=query.device)
    else:
        partial_max = partial_sum = partial_acc = out  # unused

    # NOTE: the interpreter (CPU tensors) computes bf16 tl.dot wrongly; it gets fp32 tiles instead.
    upcast = query.device.type != "cuda"
    # fp32 caches are the exactness baseline: keep tl.dot in true fp32 rather than TF32.
    dot_precision = "ieee" if key_cache.dtype == torch.float32 else "tf32"
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, segments)
    paged_attention_kernel[grid](
        query,
        key_cache,
        value_cache,
        out,
        partial_max,
        partial_sum,
        partial_acc,
        query_start_loc,
        seq_lens,
        block_tables,
        scale * math.log2(math.e),
        num_seqs,
        num_heads,
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        NUM_SEGMENTS=segments,
        WRITE_PARTIALS=split_k,
        HAS_WINDOW=sliding_window is not None,
        UPCAST=upcast,
        DOT_PRECISION=dot_precision,
        num_warps=4,
    )
    if split_k:
        segments_pad = triton.next_power_of_2(segments)
        # Enough heads per program to amortise its overhead, few enough that the [heads, segments, head_dim]
        # tile stays small.
        block_h = max(1, min(triton.next_power_of_2(num_heads), 8192 // (segments_pad * head_dim_pad)))
        reduce_segments_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            out,
            partial_max,
            partial_sum,
            partial_acc,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            NUM_SEGMENTS=segments,
            NUM_SEGMENTS_PAD=segments_pad,
            BLOCK_H=block_h,
        )
    return out


def choose_num_segments(
    num_seqs: int,
    num_kv_heads: int,
    max_context: int,
    decode_only: bool,
    num_sms: int,
    min_context: int = SPLIT_K_MIN_CONTEXT,
) -> int:
    """How many segments to split each sequence's keys into; 1 means the single-pass kernel.

    Split-K pays when a decode-only batch has too few (sequence, KV head) programs to fill the GPU and each must
    stream a long context: then segments multiply the programs up to about two waves of SMs, while keeping at least
    `SPLIT_K_MIN_SEGMENT` keys per segment. Prefill rows already bring enough programs, so they never split.
    """
    programs = num_seqs * num_kv_heads
    if not decode_only or max_context < min_context or programs >= num_sms:
        return 1
    by_occupancy = triton.cdiv(2 * num_sms, programs)
    by_length = max(1, max_context // SPLIT_K_MIN_SEGMENT)
    return min(SPLIT_K_MAX_SEGMENTS, by_occupancy, by_length)


def _tile_shape(decode_only: bool, group: int, head_dim: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_M query rows, BLOCK_Q new tokens, BLOCK_N keys) per tile. Untuned defaults, as for split-K."""
    # Decodes get the smallest tile that holds a KV head's query group. Batches with prefill rows get 64 rows, which
    # costs the decodes among them little: they are bound by loading K/V, not by the wider dot.
    block_m = max(16 if decode_only else 64, triton.next_power_of_2(group))
    # 64 keys per tile, halved where K and V tiles would crowd the shared memory of GPUs smaller than an H100.
    block_n = 64 if triton.next_power_of_2(head_dim) * element_size <= 256 else 32
    return block_m, block_m // group, block_n


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: splitting never helps there


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the Triton attention backend got {tensor.device.type} tensors: it needs CUDA, or TRITON_INTERPRET=1 set "
            "before triton is first imported to run (slowly) on CPU; on CPU use attention_backend='torch'"
        )


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key and value caches differ: {key_cache.shape}/{key_cache.dtype} vs "
                         f"{value_cache.shape}/{value_cache.dtype}")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("KV caches must be contiguous in head_dim")


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_key_cache_block,
    stride_key_cache_slot,
    stride_key_cache_head,
    stride_value_cache_block,
    stride_value_cache_slot,
    stride_value_cache_head,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    NUM_KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, NUM_KV_HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask)
    value = tl.load(
        value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :], mask=mask
    )
    key_slot = key_cache_ptr + block * stride_key_cache_block + offset * stride_key_cache_slot
    value_slot = value_cache_ptr + block * stride_value_cache_block + offset * stride_value_cache_slot
    tl.store(
        key_slot + heads[:, None] * stride_key_cache_head + dims[None, :],
        key.to(key_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        value_slot + heads[:, None] * stride_value_cache_head + dims[None, :],
        value.to(value_cache_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _copy_blocks_kernel(
    key_cache_ptr,
    value_cache_ptr,
    block_mapping_ptr,
    stride_key_block,
    stride_value_block,
    block_numel,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < block_numel
    src = tl.load(block_mapping_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(block_mapping_ptr + 2 * pair + 1).to(tl.int64)
    key = tl.load(key_cache_ptr + src * stride_key_block + offsets, mask=mask)
    tl.store(key_cache_ptr + dst * stride_key_block + offsets, key, mask=mask)
    value = tl.load(value_cache_ptr + src * stride_value_block + offsets, mask=mask)
    tl.store(value_cache_ptr + dst * stride_value_block + offsets, value, mask=mask)


class TritonAttentionBackend:
    """The Triton backend as the model runner holds it: one per engine, like `TorchAttentionBackend`.

    It keeps no state between calls today (split-K partials are allocated per call); an instance is where a reused
    workspace would live.
    """

    name = "triton"
    write_kv_cache = staticmethod(write_kv_cache)
    paged_attention = staticmethod(paged_attention)
    copy_blocks = staticmethod(copy_blocks)
