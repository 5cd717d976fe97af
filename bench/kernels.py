"""Kernel micro-benchmarks for the Triton attention backend: `python -m bench.kernels` (needs a CUDA GPU).

Each kernel is timed with `triton.testing.do_bench` (median; L2 flushed between runs) and compared with
- its memory roofline: the bytes it must move (K/V read, Q read, output written) ÷ the copy bandwidth measured here
  with a large device-to-device tensor copy; decode attention should get close to it;
- torch SDPA over the same K/V already gathered into contiguous tensors (gathering not timed): the dense kernel a
  paged one has to keep up with.
Decode cases are timed on both attention paths (single pass and split-K) next to the heuristic's pick.
`--dry-run` runs tiny shapes on CPU in Triton's interpreter to check the script itself; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Geometry:
    """The attention shape of one layer of the model being served, and the cache layout."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


@dataclass(frozen=True)
class AttentionCase:
    name: str
    seqs: tuple[tuple[int, int], ...]  # (seq_len, q_len) per sequence; new tokens are the last q_len positions

    @property
    def is_decode(self) -> bool:
        return all(q_len == 1 for _, q_len in self.seqs)


@dataclass
class Row:
    kernel: str
    case: str
    auto_ms: float
    single_pass_ms: float | None = None
    split_k_ms: float | None = None
    sdpa_ms: float | None = None
    roofline_ms: float | None = None
    tflops: float | None = None
    path: str = ""


def attention_cases(quick: bool) -> list[AttentionCase]:
    decode_batches, decode_contexts = ((1, 8, 32, 128), (1024, 8192, 32768)) if not quick else ((1, 32), (4096,))
    cases = [
        AttentionCase(f"decode batch {batch} ctx {context}", ((context, 1),) * batch)
        for batch in decode_batches
        for context in decode_contexts
        if batch * context <= 1 << 20  # the cache must fit next to everything else
    ]
    prefill_lengths = (512, 2048, 8192) if not quick else (1024,)
    cases += [AttentionCase(f"prefill {length}", ((length, length),)) for length in prefill_lengths]
    cases += [
        AttentionCase("prefill 4 x 1024", ((1024, 1024),) * 4),
        AttentionCase("prefix hit 4 x (3072 cached + 1024)", ((4096, 1024),) * 4),
        AttentionCase("mixed: chunk 512 + 32 decodes ctx 2048", ((2048, 512),) + ((2048, 1),) * 32),
    ]
    return cases


def dry_run_cases() -> list[AttentionCase]:
    return [
        AttentionCase("decode batch 2 ctx 96", ((96, 1),) * 2),
        AttentionCase("prefill 48", ((48, 48),)),
        AttentionCase("mixed: chunk 16 + 2 decodes", ((40, 16), (30, 1), (20, 1))),
    ]


@dataclass
class AttentionInputs:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    scale: float

    def args(self) -> tuple:
        return (
            self.query,
            self.key_cache,
            self.value_cache,
            self.query_start_loc,
            self.seq_lens,
            self.block_tables,
            self.scale,
        )


def make_inputs(case: AttentionCase, geometry: Geometry, device: torch.device) -> AttentionInputs:
    """Random Q and cache, each sequence in randomly permuted blocks (a real cache is fragmented too)."""
    block_size = geometry.block_size
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in case.seqs]
    num_blocks = sum(blocks_per_seq)
    physical = torch.randperm(num_blocks, device=device).to(torch.int32)
    block_tables = torch.zeros(len(case.seqs), max(blocks_per_seq), dtype=torch.int32, device=device)
    start = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = physical[start : start + count]
        start += count
    cache_shape = (num_blocks, block_size, geometry.num_kv_heads, geometry.head_dim)
    q_lens = [q_len for _, q_len in case.seqs]
    query_start_loc = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    num_tokens = sum(q_lens)
    return AttentionInputs(
        query=torch.randn(num_tokens, geometry.num_heads, geometry.head_dim, device=device, dtype=geometry.dtype),
        key_cache=torch.randn(cache_shape, device=device, dtype=geometry.dtype),
        value_cache=torch.randn(cache_shape, device=device, dtype=geometry.dtype),
        query_start_loc=query_start_loc,
        seq_lens=torch.tensor([seq_len for seq_len, _ in case.seqs], dtype=torch.int32, device=device),
        block_tables=block_tables,
        scale=geometry.head_dim**-0.5,
    )


def attention_bytes(case: AttentionCase, geometry: Geometry) -> int:
    """Bytes an ideal kernel moves: every sequence's K and V once, the queries once, the output once."""
    element = torch.finfo(geometry.dtype).bits // 8
    kv = sum(seq_len for seq_len, _ in case.seqs) * geometry.num_kv_heads * geometry.head_dim * 2
    q_and_out = sum(q_len for _, q_len in case.seqs) * geometry.num_heads * geometry.head_dim * 2
    return (kv + q_and_out) * element


def attention_flops(case: AttentionCase, geometry: Geometry) -> int:
    """Multiply-adds x 2 of QK^T and PV over the causally visible keys only."""
    visible = sum(
        sum(range(seq_len - q_len + 1, seq_len + 1)) for seq_len, q_len in case.seqs
    )  # new token at position p sees p + 1 keys
    return 4 * visible * geometry.num_heads * geometry.head_dim


def sdpa_on_gathered_kv(inputs: AttentionInputs, case: AttentionCase, geometry: Geometry) -> Callable[[], None]:
    """SDPA over contiguous K/V, one call per group of same-shaped sequences; the gather happens here, untimed."""
    groups: dict[tuple[int, int], list[int]] = {}
    for seq, shape in enumerate(case.seqs):
        groups.setdefault(shape, []).append(seq)
    calls = []
    q_starts = inputs.query_start_loc.tolist()
    for (seq_len, q_len), seqs in groups.items():
        positions = torch.arange(seq_len, device=inputs.query.device)
        tables = inputs.block_tables[seqs].long()[:, positions // geometry.block_size]  # [n, seq_len]
        offsets = positions % geometry.block_size
        keys = inputs.key_cache[tables, offsets].transpose(1, 2).contiguous()  # [n, KVH, seq_len, D]
        values = inputs.value_cache[tables, offsets].transpose(1, 2).contiguous()
        queries = torch.stack([inputs.query[q_starts[seq] : q_starts[seq] + q_len] for seq in seqs]).transpose(1, 2)
        queries = queries.contiguous()  # [n, H, q_len, D]
        mask = None
        if 1 < q_len < seq_len:  # causal, aligned to the end: the new tokens are the last q_len positions
            mask = positions[None, :] <= positions[seq_len - q_len :, None]
        calls.append((queries, keys, values, mask, q_len == seq_len and q_len > 1))

    def run() -> None:
        for queries, keys, values, mask, is_causal in calls:
            F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, is_causal=is_causal, scale=inputs.scale, enable_gqa=True
            )

    return run


def bench_attention(
    case: AttentionCase, geometry: Geometry, device: torch.device, timer: Callable, bandwidth: float
) -> Row:
    from kernels import triton_backend

    inputs = make_inputs(case, geometry, device)
    out = torch.empty_like(inputs.query)
    row = Row(kernel="paged_attention", case=case.name, auto_ms=0.0)
    row.auto_ms = timer(lambda: triton_backend.paged_attention(*inputs.args(), out=out))
    if case.is_decode:
        row.single_pass_ms = timer(lambda: triton_backend.paged_attention(*inputs.args(), split_k=False, out=out))
        row.split_k_ms = timer(lambda: triton_backend.paged_attention(*inputs.args(), split_k=True, out=out))
        num_sms = triton_backend._num_sms(device)
        max_context = inputs.block_tables.shape[1] * geometry.block_size
        segments = triton_backend.choose_num_segments(
            len(case.seqs), geometry.num_kv_heads, max_context, True, num_sms
        )
        row.path = f"split-K x{segments}" if segments > 1 else "single pass"
    else:
        row.path = "single pass"
    row.sdpa_ms = timer(sdpa_on_gathered_kv(inputs, case, geometry))
    row.roofline_ms = attention_bytes(case, geometry) / bandwidth * 1e3
    row.tflops = attention_flops(case, geometry) / (row.auto_ms * 1e-3) / 1e12
    return row


def bench_cache_ops(
    geometry: Geometry, device: torch.device, timer: Callable, bandwidth: float, small: bool
) -> list[Row]:
    from kernels import triton_backend

    element = torch.finfo(geometry.dtype).bits // 8
    token_bytes = geometry.num_kv_heads * geometry.head_dim * element
    num_blocks = 64 if small else 8192
    cache_shape = (num_blocks, geometry.block_size, geometry.num_kv_heads, geometry.head_dim)
    key_cache = torch.randn(cache_shape, device=device, dtype=geometry.dtype)
    value_cache = torch.randn_like(key_cache)
    rows = []
    for num_tokens in (4, 16) if small else (128, 8192):
        key = torch.randn(num_tokens, geometry.num_kv_heads, geometry.head_dim, device=device, dtype=geometry.dtype)
        slot_mapping = torch.randperm(num_blocks * geometry.block_size, device=device)[:num_tokens]
        ms = timer(lambda: triton_backend.write_kv_cache(key, key, key_cache, value_cache, slot_mapping))
        moved = 2 * 2 * num_tokens * token_bytes  # K and V, read and written
        rows.append(Row("write_kv_cache", f"{num_tokens} tokens", ms, roofline_ms=moved / bandwidth * 1e3))

    num_layers, num_pairs = (2, 4) if small else (32, 64)
    key_caches = [key_cache[: num_blocks // 2].clone() for _ in range(num_layers)]
    value_caches = [value_cache[: num_blocks // 2].clone() for _ in range(num_layers)]
    pairs = torch.randperm(num_blocks // 2, device=device)[: 2 * num_pairs].view(num_pairs, 2)
    ms = timer(lambda: triton_backend.copy_blocks(key_caches, value_caches, pairs))
    moved = 2 * 2 * num_layers * num_pairs * geometry.block_size * token_bytes
    rows.append(
        Row("copy_blocks", f"{num_layers} layers x {num_pairs} blocks", ms, roofline_ms=moved / bandwidth * 1e3)
    )
    return rows


def copy_bandwidth(device: torch.device, timer: Callable, num_bytes: int) -> float:
    """Bytes per second of a large device-to-device copy, counting both the read and the write."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = timer(lambda: target.copy_(source))
    return 2 * num_bytes / (ms * 1e-3)


def cuda_timer(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def wall_timer(fn: Callable[[], object]) -> float:
    """For --dry-run only: one warm-up, then the median of three runs, in ms."""
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[1]


def print_table(rows: list[Row], bandwidth: float, geometry: Geometry, device_name: str) -> None:
    print(
        f"{device_name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; {geometry.num_heads} heads, "
        f"{geometry.num_kv_heads} KV heads, head_dim {geometry.head_dim}, block {geometry.block_size}, "
        f"{str(geometry.dtype).removeprefix('torch.')}"
    )
    header = (
        "kernel", "case", "triton ms", "path", "1-pass ms", "split ms", "SDPA ms", "roofline ms", "% roof", "TFLOP/s"
    )
    table = [header]
    fmt = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    for row in rows:
        roof = None if row.roofline_ms is None else 100 * row.roofline_ms / row.auto_ms
        table.append(
            (
                row.kernel,
                row.case,
                fmt(row.auto_ms),
                row.path or "-",
                fmt(row.single_pass_ms),
                fmt(row.split_k_ms),
                fmt(row.sdpa_ms),
                fmt(row.roofline_ms),
                "-" if roof is None else f"{roof:.0f}%",
                "-" if row.tflops is None else f"{row.tflops:.1f}",
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for index, line in enumerate(table):
        # Names left-aligned, numbers right-aligned.
        cells = [cell.ljust(width) if column < 2 else cell.rjust(width) for column, (cell, width) in
                 enumerate(zip(line, widths))]
        print("  ".join(cells))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the Triton attention kernels against roofline and SDPA.")
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="a few representative shapes only")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on CPU in the interpreter (checks the script only)"
    )
    args = parser.parse_args(argv)

    if args.dry_run:
        # Must precede the first import of triton, which happens lazily below.
        os.environ["TRITON_INTERPRET"] = "1"
        device, timer, device_name = torch.device("cpu"), wall_timer, "CPU (interpreter, dry run)"
        geometry = Geometry(4, 2, 64, args.block_size, torch.float32)
        cases, bandwidth_bytes = dry_run_cases(), 1 << 24
    elif not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU: it times compiled Triton kernels. Nothing to do on this machine.")
        return 0
    else:
        device, timer = torch.device("cuda"), cuda_timer
        device_name = torch.cuda.get_device_name(device)
        geometry = Geometry(args.num_heads, args.num_kv_heads, args.head_dim, args.block_size, DTYPES[args.dtype])
        cases, bandwidth_bytes = attention_cases(args.quick), 1 << 30

    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device, timer, bandwidth_bytes)
    rows = [bench_attention(case, geometry, device, timer, bandwidth) for case in cases]
    rows += bench_cache_ops(geometry, device, timer, bandwidth, small=args.dry_run)
    print_table(rows, bandwidth, geometry, device_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
