"""PyTorch attention backend: the CPU path and the readable statement of the attention contract.

Shapes follow ../shared/DESIGN.md: caches are `[num_blocks, block_size, num_kv_heads, head_dim]`, a step is a
flattened batch of `T` new tokens from `S` sequences described by `query_start_loc`, `seq_lens` and
`block_tables`. The new tokens of a sequence are the last `q_len` positions of its `seq_len`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter the step's new K/V rows `[T, num_kv_heads, head_dim]` into their slots; slot -1 is skipped."""
    num_blocks, block_size = key_cache.shape[:2]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    flat_key_cache = key_cache.view(num_blocks * block_size, *key_cache.shape[2:])
    flat_value_cache = value_cache.view(num_blocks * block_size, *value_cache.shape[2:])
    flat_key_cache.index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    flat_value_cache.index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """Copy whole blocks `block_mapping[i, 0] -> block_mapping[i, 1]` in every layer (copy-on-write)."""
    if block_mapping.numel() == 0:
        return
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    for key_cache, value_cache in zip(key_caches, value_caches):
        key_cache.index_copy_(0, dst, key_cache.index_select(0, src))
        value_cache.index_copy_(0, dst, value_cache.index_select(0, src))


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each new token over its sequence's cached and new K/V. Returns `[T, num_heads, head_dim]`.

    NOTE: decodes (one new token) and prefill chunks are padded and run as two masked SDPA calls, so a step costs
    a handful of kernels rather than a Python loop over sequences, and one long prefill does not pad every decode
    to its length.
    """
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    is_decode = q_lens == 1
    if bool(is_decode.all()) or not bool(is_decode.any()):
        return _padded_attention(
            query, key_cache, value_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window
        )
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    for group in (is_decode, ~is_decode):
        seq_index = group.nonzero().flatten()
        group_q_lens = q_lens[seq_index]
        rows = _token_rows(query_start_loc[seq_index], group_q_lens)
        group_start_loc = F.pad(group_q_lens.cumsum(0), (1, 0)).to(query_start_loc.dtype)
        out[rows] = _padded_attention(
            query[rows],
            key_cache,
            value_cache,
            group_start_loc,
            seq_lens[seq_index],
            block_tables[seq_index],
            scale,
            sliding_window,
        )
    return out


def _token_rows(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Flattened row indices `starts[i] + 0 .. lengths[i]-1` for every i."""
    offsets = torch.arange(int(lengths.sum()), device=starts.device) - torch.repeat_interleave(
        F.pad(lengths.cumsum(0), (1, 0))[:-1], lengths
    )
    return torch.repeat_interleave(starts, lengths) + offsets


def _padded_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    max_q_len = int(q_lens.max())
    max_seq_len = int(seq_lens.max())
    max_blocks = (max_seq_len + block_size - 1) // block_size
    context_len = max_blocks * block_size
    device = query.device

    # Gather each sequence's context: [S, context_len, num_kv_heads, head_dim].
    tables = block_tables[:, :max_blocks].long()
    keys = key_cache[tables].reshape(num_seqs, context_len, num_kv_heads, head_dim)
    values = value_cache[tables].reshape(num_seqs, context_len, num_kv_heads, head_dim)
    k_positions = torch.arange(context_len, device=device)
    # NOTE: slots past seq_len (the last block's tail, the blocks behind the table's 0 padding) hold whatever was
    # there before, NaN included in never-written memory. Masking their scores is not enough (0 * NaN is NaN in
    # the weighted sum), so zero them.
    in_context = (k_positions[None, :] < seq_lens[:, None])[:, :, None, None]
    keys = keys.masked_fill(~in_context, 0)
    values = values.masked_fill(~in_context, 0)

    # Pad queries: row r of sequence s holds position seq_len - q_len + r.
    q_rows = torch.arange(max_q_len, device=device)
    q_valid = q_rows[None, :] < q_lens[:, None]  # [S, max_q]
    token_index = (query_start_loc[:-1, None] + q_rows[None, :]).clamp(max=num_tokens - 1)
    padded_query = query[token_index]  # [S, max_q, H, D]

    q_positions = (seq_lens - q_lens)[:, None] + q_rows[None, :]  # [S, max_q]
    allowed = (k_positions[None, None, :] <= q_positions[:, :, None]) & (
        k_positions[None, None, :] < seq_lens[:, None, None]
    )
    if sliding_window is not None:
        allowed &= k_positions[None, None, :] > q_positions[:, :, None] - sliding_window
    # Padded query rows attend to key 0 so that softmax stays finite; their output is dropped below.
    allowed[:, :, 0] |= ~q_valid

    group = num_heads // num_kv_heads
    out = F.scaled_dot_product_attention(
        padded_query.transpose(1, 2).to(key_cache.dtype),  # [S, H, max_q, D]
        keys.transpose(1, 2),  # [S, KVH, L, D]
        values.transpose(1, 2),
        attn_mask=allowed[:, None, :, :],
        scale=scale,
        enable_gqa=group > 1,
    )  # [S, H, max_q, D]
    return out.transpose(1, 2)[q_valid].to(query.dtype)
