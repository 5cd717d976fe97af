"""Triton kernels for attention over the paged KV cache (see ../shared/DESIGN.md, "Attention contract").

One program handles a block of one sequence's new tokens against one KV head. The query heads that share that KV
head are packed into the rows of the tile (GQA packing), so each K/V tile is loaded once per KV head and feeds
`group * BLOCK_Q` query rows: row `m` is new token `m // group`, query head `kv_head * group + m % group`.
Keys are gathered through the block table one position at a time, so the key tile size is independent of the
cache's block size. Softmax is computed online in fp32 (log2 domain, `exp2`).

With `WRITE_PARTIALS`, the key range is cut into `NUM_SEGMENTS` segments (flash-decoding, split-K): each program
writes its unnormalised `(max, sum, acc)` and `reduce_segments_kernel` combines them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_attention_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    partial_acc_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain
    num_seqs,
    num_heads,
    sliding_window,
    stride_query_token,
    stride_query_head,
    stride_out_token,
    stride_out_head,
    stride_key_block,
    stride_key_slot,
    stride_key_head,
    stride_value_block,
    stride_value_slot,
    stride_value_head,
    stride_block_table_seq,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    # Sequence i owns program ids starting at query_start_loc[i] // BLOCK_Q + i: monotonic, at least
    # cdiv(q_len, BLOCK_Q) apart, and computable without a host sync. Binary-search for the owner of this program.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_program = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first_program <= q_block, mid + 1, lo)
        hi = tl.where(first_program <= q_block, hi, mid)
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:
        return  # a gap between two sequences' program ranges
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_index = local_block * BLOCK_Q + rows // GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_index < q_len)
    token = (q_start + q_index).to(tl.int64)
    head = kv_head * GROUP + rows % GROUP
    q_pos = context_len + q_index
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM

    row_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(
        query_ptr + token[:, None] * stride_query_token + head[:, None] * stride_query_head + dims[None, :],
        mask=row_mask,
        other=0.0,
    )
    q = q.to(key_cache_ptr.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)

    # Keys this tile can see: up to its last query's position, from the window start of its first query.
    kv_end = context_len + tl.minimum((local_block + 1) * BLOCK_Q, q_len)
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(context_len + local_block * BLOCK_Q - sliding_window + 1, 0)
    kv_start = kv_start // BLOCK_N * BLOCK_N
    num_tiles = (kv_end - kv_start + BLOCK_N - 1) // BLOCK_N
    tiles_per_segment = (num_tiles + NUM_SEGMENTS - 1) // NUM_SEGMENTS
    segment_start = kv_start + segment * tiles_per_segment * BLOCK_N
    segment_end = tl.minimum(segment_start + tiles_per_segment * BLOCK_N, kv_end)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_block_table_seq
    for tile_start in range(segment_start, segment_end, BLOCK_N):
        k_pos = tile_start + offs_n
        k_valid = k_pos < kv_end
        # Masked so that padding entries past seq_len are never read.
        physical_block = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        slot = k_pos % BLOCK_SIZE
        kv_mask = k_valid[:, None] & dim_valid[None, :]
        k = tl.load(
            key_cache_ptr
            + physical_block[:, None] * stride_key_block
            + slot[:, None] * stride_key_slot
            + kv_head * stride_key_head
            + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            value_cache_ptr
            + physical_block[:, None] * stride_value_block
            + slot[:, None] * stride_value_slot
            + kv_head * stride_value_head
            + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if UPCAST:
            # NOTE: the interpreter computes bf16 tl.dot wrongly; fp32 tiles are exact there and cost nothing.
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        allowed = row_valid[:, None] & k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(allowed, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with no visible key yet keeps max -inf; shift by 0 instead so that exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if WRITE_PARTIALS:
        partial = (token * num_heads + head) * NUM_SEGMENTS + segment
        tl.store(partial_max_ptr + partial, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + partial, l_i, mask=row_valid)
        tl.store(partial_acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask,
        )


@triton.jit
def reduce_segments_kernel(
    out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    partial_acc_ptr,
    num_heads,
    stride_out_token,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    NUM_SEGMENTS_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Combine the segment partials of `BLOCK_H` heads of one token: rescale each to the global max, normalise."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    segments = tl.arange(0, NUM_SEGMENTS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    head_valid = heads < num_heads
    dim_valid = dims < HEAD_DIM

    partial = (token * num_heads + heads[:, None]) * NUM_SEGMENTS + segments[None, :]  # [BLOCK_H, SEGMENTS]
    partial_mask = head_valid[:, None] & (segments < NUM_SEGMENTS)[None, :]
    segment_max = tl.load(partial_max_ptr + partial, mask=partial_mask, other=float("-inf"))
    segment_sum = tl.load(partial_sum_ptr + partial, mask=partial_mask, other=0.0)
    segment_acc = tl.load(
        partial_acc_ptr + partial[:, :, None] * HEAD_DIM + dims[None, None, :],
        mask=partial_mask[:, :, None] & dim_valid[None, None, :],
        other=0.0,
    )
    # Every token sees at least itself, so some segment has a finite max; empty segments (-inf) weigh 0.
    # Padding heads have no finite max: shift them by 0 so they stay NaN-free (they are not stored).
    head_max = tl.max(segment_max, 1)
    head_max = tl.where(head_max == float("-inf"), 0.0, head_max)
    weight = tl.exp2(segment_max - head_max[:, None])
    total = tl.sum(segment_sum * weight, 1)
    out = tl.sum(segment_acc * weight[:, :, None], 1) / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(
        out_ptr + token * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_valid[:, None] & dim_valid[None, :],
    )
