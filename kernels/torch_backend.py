"""PyTorch attention backend: the CPU path and the readable statement of the attention contract.

Shapes follow ../shared/DESIGN.md: caches are `[num_blocks, block_size, num_kv_heads, head_dim]`, a step is a
flattened batch of `T` new tokens from `S` sequences described by `query_start_loc`, `seq_lens` and
`block_tables`. The new tokens of a sequence are the last `q_len` positions of its `seq_len`.

`TorchAttentionBackend` is what the model runner holds; the module functions are the stateless statement of each op.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# Padded K/V elements (sequences x context x KV heads x head dim) below which a step's decodes (or prefill chunks)
# stay one group: a 4-layer 64-wide model's 24 decodes (~0.3 M) in one, the default model's 64 (~5 M) split.
MIN_SPLIT_ELEMENTS = 1 << 20


class TorchAttentionBackend:
    """The PyTorch backend as the model runner holds it: one per engine, owning the state its layers share.

    A step's layers share one padding plan, and every layer gathers its context into the same workspace; both live
    here, not in the module, so two engines in one process (each stepping on its own thread) never share them.
    An instance is not thread-safe: one engine, one instance.
    """

    name = "torch"

    def __init__(self) -> None:
        self.plan_cache = PlanCache()
        self.workspace = GatherWorkspace()

    write_kv_cache = staticmethod(write_kv_cache)
    copy_blocks = staticmethod(copy_blocks)

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
    ) -> torch.Tensor:
        return paged_attention(
            query,
            key_cache,
            value_cache,
            query_start_loc,
            seq_lens,
            block_tables,
            scale,
            sliding_window,
            plan_cache=self.plan_cache,
            workspace=self.workspace,
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
    plan_cache: PlanCache | None = None,
    workspace: GatherWorkspace | None = None,
) -> torch.Tensor:
    """Causal attention of each new token over its sequence's cached and new K/V. Returns `[T, num_heads, head_dim]`.

    NOTE: decodes (one new token) and prefill chunks are padded into a few groups of similar length and run as one
    masked SDPA call per group, so a step costs a handful of kernels rather than a Python loop over sequences, and
    one long sequence does not pad every other to its length. The padding plan (gather indices, masks) depends only
    on the step's metadata, so `plan_cache` lets every layer of a step reuse it; `workspace` holds the buffer the
    context is gathered into. Without them the plan is built and the buffer allocated for this call alone.
    """
    # One group while the padded context of the step is small in elements: launches cost more than padding then.
    min_split_work = max(4096, MIN_SPLIT_ELEMENTS // (key_cache.shape[2] * key_cache.shape[3]))
    plan_args = (query_start_loc, seq_lens, block_tables, key_cache.shape[1], sliding_window, query.dtype,
                 min_split_work)  # fmt: skip
    plan = plan_cache.get_or_build(*plan_args) if plan_cache is not None else _build_plan(*plan_args)
    workspace = workspace if workspace is not None else GatherWorkspace()
    if len(plan) == 1:
        return _padded_attention(query, key_cache, value_cache, plan[0], scale, workspace)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    for group in plan:
        out[group.rows] = _padded_attention(query[group.rows], key_cache, value_cache, group, scale, workspace)
    return out


@dataclass
class _GroupPlan:
    """How one group of sequences (all decodes, or all prefill chunks) is padded into a batch."""

    rows: torch.Tensor | None  # the group's token rows in the step (None: all of them)
    token_index: torch.Tensor  # [S, max_q] row of each padded query (clamped)
    q_valid: torch.Tensor  # [S, max_q]
    block_ids: torch.Tensor  # [S * max_blocks] blocks to gather, in order
    context_len: int  # max_blocks * block_size
    beyond_seq_len: torch.Tensor  # flat indices into [S * context_len] of gathered slots past each seq_len
    mask: torch.Tensor  # [S, 1, max_q, context_len] additive: 0 where allowed, -inf elsewhere


class PlanCache:
    """The last step's padding plan, reused while the same metadata tensors come back (every layer of a step)."""

    def __init__(self) -> None:
        self._metadata: tuple[torch.Tensor, ...] = ()
        self._layout: tuple[int, int | None, torch.dtype] | None = None
        self._plan: list[_GroupPlan] = []

    def get_or_build(
        self,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        block_size: int,
        sliding_window: int | None,
        dtype: torch.dtype,
        min_split_work: int = 4096,
    ) -> list[_GroupPlan]:
        metadata, layout = (query_start_loc, seq_lens, block_tables), (block_size, sliding_window, dtype, min_split_work)
        # NOTE: identity, not equality: the model runner passes the same metadata tensors to every layer of a step,
        # and comparing contents would cost a device sync per layer. Holding the tensors keeps their ids from being
        # reused by later ones. A runner that rewrites metadata in place must pass new tensor objects (views will do)
        # each step: inference tensors carry no version counter that could tell.
        if layout == self._layout and all(cached is current for cached, current in zip(self._metadata, metadata)):
            return self._plan
        self._plan = _build_plan(query_start_loc, seq_lens, block_tables, block_size, sliding_window, dtype,
                                 min_split_work)  # fmt: skip
        self._metadata, self._layout = metadata, layout
        return self._plan


def _build_plan(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    dtype: torch.dtype,
    min_split_work: int = 4096,
) -> list[_GroupPlan]:
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    q_lens_list, seq_lens_list = q_lens.tolist(), seq_lens.tolist()
    decodes = [i for i, q in enumerate(q_lens_list) if q == 1]
    prefills = [i for i, q in enumerate(q_lens_list) if q > 1]
    # Decodes are bucketed by context length, prefill chunks by chunk length: what each group is padded to.
    groups = _length_buckets(decodes, [seq_lens_list[i] for i in decodes], min_split_work=min_split_work)
    groups += _length_buckets(prefills, [q_lens_list[i] for i in prefills], min_split_work=min_split_work)
    if len(groups) == 1:
        return [_group_plan(None, query_start_loc, seq_lens, block_tables, block_size, sliding_window, dtype)]
    plans = []
    for members in groups:
        seq_index = torch.tensor(members, device=seq_lens.device)
        group_q_lens = q_lens[seq_index]
        rows = _token_rows(query_start_loc[seq_index], group_q_lens)
        group_start_loc = F.pad(group_q_lens.cumsum(0), (1, 0)).to(query_start_loc.dtype)
        plans.append(
            _group_plan(
                rows, group_start_loc, seq_lens[seq_index], block_tables[seq_index], block_size, sliding_window, dtype
            )
        )
    return plans


def _length_buckets(
    members: list[int], lengths: list[int], ratio: float = 0.6, max_buckets: int = 4, min_split_work: int = 4096
) -> list[list[int]]:
    """`members` split into at most `max_buckets` groups, each holding lengths of at least `ratio` × its longest.

    NOTE: a padded batch costs its longest member's length for every member; a group costs a few kernel launches
    per layer. With contexts spread 1:10 in a batch, four buckets at 0.6 halve the padded work of one batch. Below
    `min_split_work` padded positions the launches cost more than the padding: one group (a few long requests
    finishing last, small batches).
    """
    if not members:
        return []
    if len(members) * max(lengths) <= min_split_work:
        return [sorted(members)]
    order = sorted(range(len(members)), key=lambda k: -lengths[k])
    buckets = [[order[0]]]
    for k in order[1:]:
        if lengths[k] < ratio * lengths[buckets[-1][0]] and len(buckets) < max_buckets:
            buckets.append([k])
        else:
            buckets[-1].append(k)
    return [sorted(members[k] for k in bucket) for bucket in buckets]


def _group_plan(
    rows: torch.Tensor | None,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    dtype: torch.dtype,
) -> _GroupPlan:
    device = seq_lens.device
    num_tokens = int(query_start_loc[-1])
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    max_q_len = int(q_lens.max())
    max_blocks = -(-int(seq_lens.max()) // block_size)
    context_len = max_blocks * block_size

    # Row r of sequence s holds position seq_len - q_len + r.
    q_rows = torch.arange(max_q_len, device=device)
    q_valid = q_rows[None, :] < q_lens[:, None]
    token_index = (query_start_loc[:-1, None] + q_rows[None, :]).clamp(max=num_tokens - 1)
    q_positions = (seq_lens - q_lens)[:, None] + q_rows[None, :]
    k_positions = torch.arange(context_len, device=device)
    allowed = (k_positions[None, None, :] <= q_positions[:, :, None]) & (
        k_positions[None, None, :] < seq_lens[:, None, None]
    )
    if sliding_window is not None:
        allowed &= k_positions[None, None, :] > q_positions[:, :, None] - sliding_window
    # Padded query rows attend to key 0 so that softmax stays finite; their output is dropped.
    allowed[:, :, 0] |= ~q_valid
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return _GroupPlan(
        rows=rows,
        token_index=token_index,
        q_valid=q_valid,
        block_ids=block_tables[:, :max_blocks].reshape(-1).long(),
        context_len=context_len,
        beyond_seq_len=(k_positions[None, :] >= seq_lens[:, None]).reshape(-1).nonzero().flatten(),
        mask=mask[:, None, :, :],
    )


def _token_rows(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Flattened row indices `starts[i] + 0 .. lengths[i]-1` for every i."""
    offsets = torch.arange(int(lengths.sum()), device=starts.device) - torch.repeat_interleave(
        F.pad(lengths.cumsum(0), (1, 0))[:-1], lengths
    )
    return torch.repeat_interleave(starts, lengths) + offsets


class GatherWorkspace:
    """Reused buffers each layer's context is gathered into, so that a step does not fault in fresh pages per layer."""

    def __init__(self) -> None:
        # Keyed by inference mode too: a buffer made under torch.inference_mode cannot be written outside it.
        self._buffers: dict[tuple[torch.dtype, torch.device, bool], torch.Tensor] = {}

    def buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least `numel` elements, valid until the next call."""
        key = (dtype, device, torch.is_inference_mode_enabled())
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel]


def _gather_context(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    num_seqs: int,
    context_len: int,
    workspace: GatherWorkspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's K and V, `[S, context_len, num_kv_heads, head_dim]`, gathered whole blocks at a time.

    NOTE: `index_select` over flattened blocks copies a block per row (memcpy), several times faster than advanced
    indexing; writing into a reused workspace avoids faulting in fresh pages every layer.
    """
    num_blocks = key_cache.shape[0]
    block_numel = key_cache[0].numel()
    needed = 2 * block_ids.numel() * block_numel
    buffer = workspace.buffer(needed, key_cache.dtype, key_cache.device)
    keys, values = buffer.view(2, block_ids.numel(), block_numel).unbind(0)
    torch.index_select(key_cache.view(num_blocks, block_numel), 0, block_ids, out=keys)
    torch.index_select(value_cache.view(num_blocks, block_numel), 0, block_ids, out=values)
    shape = (num_seqs, context_len, *key_cache.shape[2:])
    return keys.view(shape), values.view(shape)


def _padded_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: _GroupPlan,
    scale: float,
    workspace: GatherWorkspace,
) -> torch.Tensor:
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    num_seqs = plan.q_valid.shape[0]
    keys, values = _gather_context(key_cache, value_cache, plan.block_ids, num_seqs, plan.context_len, workspace)
    # Slots past seq_len are masked, but a stale inf/NaN there would still poison the sum: zero them.
    if plan.beyond_seq_len.numel():
        keys.view(-1, *keys.shape[2:]).index_fill_(0, plan.beyond_seq_len, 0)
        values.view(-1, *values.shape[2:]).index_fill_(0, plan.beyond_seq_len, 0)
    padded_query = query[plan.token_index]  # [S, max_q, H, D]
    out = F.scaled_dot_product_attention(
        padded_query.transpose(1, 2).to(key_cache.dtype),  # [S, H, max_q, D]
        keys.transpose(1, 2),  # [S, KVH, L, D]
        values.transpose(1, 2),
        attn_mask=plan.mask.to(key_cache.dtype),
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [S, H, max_q, D]
    return out.transpose(1, 2)[plan.q_valid].to(query.dtype)
