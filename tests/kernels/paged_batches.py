"""Random paged-attention batches, hypothesis strategies for them, and the float64 reference of the contract."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

BLOCK_SIZES = (8, 16, 32)
HEAD_DIMS = (64, 80, 96, 128)
GQA_GROUPS = (1, 2, 3, 4, 8)
# conftest.py runs the Triton kernels in the interpreter (on CPU) unless CUDA is available.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_device(name: str) -> torch.device:
    """Where a backend's tensors live in these tests: the fused CPU kernel's on CPU whatever DEVICE is."""
    return torch.device("cpu") if name == "cpu_fused" else DEVICE


@dataclass(frozen=True)
class BatchSpec:
    """A step's shape: `seqs` holds each sequence's (seq_len, q_len); its new tokens are its last q_len positions."""

    seqs: tuple[tuple[int, int], ...]
    num_kv_heads: int = 2
    group: int = 2
    head_dim: int = 64
    block_size: int = 16
    sliding_window: int | None = None
    seed: int = 0

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group


@dataclass
class PagedBatch:
    """One step's inputs: the cache already holds every position, including the new tokens' K/V."""

    query: torch.Tensor  # [T, num_heads, head_dim]
    key: torch.Tensor  # the new tokens' K/V, [T, num_kv_heads, head_dim], also present in the caches
    value: torch.Tensor
    slot_mapping: torch.Tensor  # int64 [T]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]; unused slots hold NaN
    value_cache: torch.Tensor
    query_start_loc: torch.Tensor  # int32 [S + 1]
    seq_lens: torch.Tensor  # int32 [S]
    block_tables: torch.Tensor  # int32 [S, max_blocks + 1], padded with 0
    scale: float
    sliding_window: int | None

    def attention_args(self) -> tuple:
        return (
            self.query,
            self.key_cache,
            self.value_cache,
            self.query_start_loc,
            self.seq_lens,
            self.block_tables,
            self.scale,
            self.sliding_window,
        )


def make_batch(
    spec: BatchSpec,
    cache_dtype: torch.dtype = torch.float32,
    query_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PagedBatch:
    """Fresh seeded random Q/K/V in randomly permuted blocks; every slot no sequence owns is NaN.

    The NaN poison makes any read past seq_len, or through a block table's padding, show up in the output.
    """
    generator = torch.Generator().manual_seed(spec.seed)
    block_size, num_kv_heads, head_dim = spec.block_size, spec.num_kv_heads, spec.head_dim
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in spec.seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN, block 0 included now and then
    physical = torch.randperm(num_blocks, generator=generator)
    block_tables = torch.zeros(len(spec.seqs), max(blocks_per_seq) + 1, dtype=torch.int32)

    cache_shape = (num_blocks * block_size, num_kv_heads, head_dim)
    flat_key_cache = torch.full(cache_shape, float("nan"), dtype=cache_dtype)
    flat_value_cache = torch.full(cache_shape, float("nan"), dtype=cache_dtype)
    query_start_loc, new_slots = [0], []
    next_block = 0
    for seq, ((seq_len, q_len), num_seq_blocks) in enumerate(zip(spec.seqs, blocks_per_seq)):
        assert 1 <= q_len <= seq_len
        block_tables[seq, :num_seq_blocks] = physical[next_block : next_block + num_seq_blocks]
        next_block += num_seq_blocks
        positions = torch.arange(seq_len)
        slots = block_tables[seq, positions // block_size].long() * block_size + positions % block_size
        flat_key_cache[slots] = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(cache_dtype)
        flat_value_cache[slots] = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(cache_dtype)
        new_slots.append(slots[seq_len - q_len :])
        query_start_loc.append(query_start_loc[-1] + q_len)

    slot_mapping = torch.cat(new_slots)
    num_tokens = query_start_loc[-1]
    query = torch.randn(num_tokens, spec.num_heads, head_dim, generator=generator).to(query_dtype)
    return PagedBatch(
        query=query.to(device),
        key=flat_key_cache[slot_mapping].to(device),
        value=flat_value_cache[slot_mapping].to(device),
        slot_mapping=slot_mapping.to(device),
        key_cache=flat_key_cache.view(num_blocks, block_size, num_kv_heads, head_dim).to(device),
        value_cache=flat_value_cache.view(num_blocks, block_size, num_kv_heads, head_dim).to(device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([seq_len for seq_len, _ in spec.seqs], dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        scale=head_dim**-0.5,
        sliding_window=spec.sliding_window,
    )


def reference_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The attention contract, one sequence at a time, in float64."""
    num_heads = query.shape[1]
    block_size, num_kv_heads = key_cache.shape[1:3]
    group = num_heads // num_kv_heads
    out = torch.full(query.shape, float("nan"), dtype=torch.float64)
    for seq, seq_len in enumerate(seq_lens.tolist()):
        start, end = query_start_loc[seq : seq + 2].tolist()
        positions = torch.arange(seq_len)
        blocks = block_tables[seq].cpu().long()[positions // block_size]
        # Query head h reads KV head h // group.
        keys = key_cache.cpu()[blocks, positions % block_size].double().repeat_interleave(group, dim=1)
        values = value_cache.cpu()[blocks, positions % block_size].double().repeat_interleave(group, dim=1)
        q_positions = torch.arange(seq_len - (end - start), seq_len)
        allowed = positions[None, :] <= q_positions[:, None]
        if sliding_window is not None:
            allowed &= positions[None, :] > q_positions[:, None] - sliding_window
        scores = torch.einsum("qhd,khd->hqk", query[start:end].cpu().double(), keys) * scale
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", weights, values)
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in `out` gives NaN (which fails every `<` check)."""
    out = out.detach().cpu().double()
    return float((out - ref).norm() / ref.norm())


@st.composite
def sequence_shapes(draw: st.DrawFn, max_seq_len: int = 300) -> tuple[int, int]:
    """(seq_len, q_len) of a prefill, a decode, or a prefix-cache hit / later prefill chunk."""
    seq_len = draw(st.integers(1, max_seq_len))
    kind = draw(st.sampled_from(["prefill", "decode", "cached_prefix"]))
    if kind == "prefill":
        return seq_len, seq_len
    if kind == "decode":
        return seq_len, 1
    return seq_len, draw(st.integers(1, seq_len))


@st.composite
def batch_specs(
    draw: st.DrawFn,
    max_seqs: int = 4,
    max_seq_len: int = 300,
    max_new_tokens: int = 320,
    windows: bool = True,
    decode_only: bool = False,
) -> BatchSpec:
    """A mixed step; `max_new_tokens` bounds T so that an interpreter run stays around a second."""
    if decode_only:
        seqs = draw(st.lists(st.integers(1, max_seq_len).map(lambda n: (n, 1)), min_size=1, max_size=max_seqs))
    else:
        seqs = draw(st.lists(sequence_shapes(max_seq_len), min_size=1, max_size=max_seqs))
    budget, bounded = max_new_tokens, []
    for seq_len, q_len in seqs:
        q_len = max(1, min(q_len, budget))
        budget -= q_len
        bounded.append((seq_len, q_len))
    group = draw(st.sampled_from(GQA_GROUPS))
    return BatchSpec(
        seqs=tuple(bounded),
        num_kv_heads=draw(st.integers(1, 2 if group < 8 else 1)),
        group=group,
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        block_size=draw(st.sampled_from(BLOCK_SIZES)),
        sliding_window=draw(st.none() | st.integers(1, 80)) if windows else None,
        seed=draw(st.integers(0, 2**31 - 1)),
    )
