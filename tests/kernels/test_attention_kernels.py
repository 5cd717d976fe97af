"""paged_attention of every backend against a float64 reference of the attention contract (DESIGN.md).

Every run writes into a NaN-poisoned output and reads a cache whose unowned slots are NaN, so an unwritten row or a
read past seq_len fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels import torch_backend

from .paged_batches import DEVICE, BatchSpec, PagedBatch, batch_specs, make_batch, reference_attention, relative_error

FP32_TOLERANCE = 1e-5
LOW_PRECISION_TOLERANCE = 1e-2


def hypothesis_settings(max_examples: int) -> settings:
    """Derandomized, so CI draws the same examples every run; interpreter runs are slow, so no deadline."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def run_triton(triton_backend, batch: PagedBatch, **kwargs) -> torch.Tensor:
    out = torch.full(batch.query.shape, float("nan"), dtype=batch.query.dtype, device=batch.query.device)
    result = triton_backend.paged_attention(*batch.attention_args(), out=out, **kwargs)
    assert result is out
    return out


def run_cpu_fused(cpu_fused_backend, batch: PagedBatch) -> torch.Tensor:
    out = torch.full(batch.query.shape, float("nan"), dtype=torch.float32)
    result = cpu_fused_backend.paged_attention(*batch.attention_args(), out=out)
    return result if batch.query.dtype != torch.float32 else out


@pytest.fixture(scope="session")
def backends(triton_backend, request: pytest.FixtureRequest):
    """The backends to compare, as (triton module, cpu_fused instance or None): cpu_fused runs on CPU tensors only."""
    cpu_fused = request.getfixturevalue("cpu_fused_backend") if DEVICE.type == "cpu" else None
    return triton_backend, cpu_fused


def assert_both_backends_match_reference(backends, batch: PagedBatch, tolerance: float) -> None:
    triton_backend, cpu_fused_backend = backends
    ref = reference_attention(*batch.attention_args())
    outputs = [
        ("triton", run_triton(triton_backend, batch)),
        ("torch", torch_backend.paged_attention(*batch.attention_args())),
    ]
    if cpu_fused_backend is not None:
        outputs.append(("cpu_fused", run_cpu_fused(cpu_fused_backend, batch)))
    for name, out in outputs:
        assert out.shape == batch.query.shape and out.dtype == batch.query.dtype, name
        error = relative_error(out, ref)
        assert error < tolerance, f"{name} backend: relative error {error:.3g}"


def check_fp32(backends, spec: BatchSpec) -> None:
    assert_both_backends_match_reference(backends, make_batch(spec, device=DEVICE), FP32_TOLERANCE)


@given(spec=batch_specs())
@hypothesis_settings(max_examples=40)
def test_fp32_matches_reference(backends, spec: BatchSpec) -> None:
    check_fp32(backends, spec)


@pytest.mark.slow
@given(spec=batch_specs(max_seqs=8, max_new_tokens=1200))
@hypothesis_settings(max_examples=150)
def test_fp32_matches_reference_many_examples(backends, spec: BatchSpec) -> None:
    check_fp32(backends, spec)


def check_low_precision(backends, spec: BatchSpec, cache_dtype: torch.dtype, query_dtype: torch.dtype) -> None:
    batch = make_batch(spec, cache_dtype=cache_dtype, query_dtype=query_dtype, device=DEVICE)
    assert_both_backends_match_reference(backends, batch, LOW_PRECISION_TOLERANCE)


LOW_PRECISION_DTYPES = st.sampled_from([torch.float16, torch.bfloat16])


@given(
    spec=batch_specs(max_seqs=3, max_seq_len=160, max_new_tokens=160),
    cache_dtype=LOW_PRECISION_DTYPES,
    query_is_fp32=st.booleans(),
)
@hypothesis_settings(max_examples=20)
def test_low_precision_kv_matches_reference(
    backends, spec: BatchSpec, cache_dtype: torch.dtype, query_is_fp32: bool
) -> None:
    check_low_precision(backends, spec, cache_dtype, torch.float32 if query_is_fp32 else cache_dtype)


@pytest.mark.slow
@given(spec=batch_specs(max_seqs=6), cache_dtype=LOW_PRECISION_DTYPES, query_is_fp32=st.booleans())
@hypothesis_settings(max_examples=80)
def test_low_precision_kv_matches_reference_many_examples(
    backends, spec: BatchSpec, cache_dtype: torch.dtype, query_is_fp32: bool
) -> None:
    check_low_precision(backends, spec, cache_dtype, torch.float32 if query_is_fp32 else cache_dtype)


# Named shapes the contract calls out, so they are covered whatever hypothesis draws.
SCENARIOS = {
    "single_prefill_head_dim_80": BatchSpec(seqs=((300, 300),), num_kv_heads=1, group=4, head_dim=80),
    "single_decode": BatchSpec(seqs=((1, 1),), num_kv_heads=2, group=3, head_dim=96, block_size=8),
    "many_short_sequences": BatchSpec(
        seqs=tuple((n % 7 + 1, n % 3 % (n % 7 + 1) + 1) for n in range(40)), group=2, block_size=8
    ),
    "prefix_cache_hits": BatchSpec(seqs=((160, 33), (64, 64), (97, 2)), group=8, num_kv_heads=1, head_dim=128),
    "decodes_and_prefill_chunk": BatchSpec(
        seqs=((250, 1), (31, 1), (200, 120), (17, 1)), num_kv_heads=2, group=1, block_size=32
    ),
    "sliding_window": BatchSpec(seqs=((180, 70), (90, 1), (40, 40)), group=4, head_dim=80, sliding_window=24),
    # Contexts and chunk lengths far apart: the PyTorch backend pads them in several length buckets.
    "decodes_and_chunks_in_length_buckets": BatchSpec(
        seqs=((300, 1), (12, 1), (150, 1), (40, 1), (290, 1), (5, 1), (260, 90), (30, 3), (120, 40), (64, 64)),
        group=2, block_size=8,
    ),
    "window_wider_than_context": BatchSpec(seqs=((50, 50), (20, 1)), group=2, sliding_window=4096),
}


@pytest.mark.parametrize("spec", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_scenario_matches_reference(backends, spec: BatchSpec) -> None:
    check_fp32(backends, spec)


@given(
    spec=batch_specs(max_seqs=4, max_new_tokens=64) | batch_specs(max_seqs=6, decode_only=True),
    num_segments=st.integers(1, 7),
)
@hypothesis_settings(max_examples=20)
def test_split_k_agrees_with_single_pass(triton_backend, spec: BatchSpec, num_segments: int) -> None:
    batch = make_batch(spec, device=DEVICE)
    single_pass = run_triton(triton_backend, batch, split_k=False)
    split = run_triton(triton_backend, batch, split_k=True, num_segments=num_segments)
    ref = reference_attention(*batch.attention_args())
    assert relative_error(single_pass, ref) < FP32_TOLERANCE
    assert relative_error(split, ref) < FP32_TOLERANCE
    assert relative_error(split, single_pass.double().cpu()) < FP32_TOLERANCE


def test_split_k_long_decode_low_precision(triton_backend) -> None:
    spec = BatchSpec(seqs=((1000, 1), (300, 1), (5, 1)), num_kv_heads=2, group=4, head_dim=128, block_size=16)
    batch = make_batch(spec, cache_dtype=torch.bfloat16, device=DEVICE)
    ref = reference_attention(*batch.attention_args())
    split = run_triton(triton_backend, batch, split_k=True, num_segments=5)
    assert relative_error(split, ref) < LOW_PRECISION_TOLERANCE


def test_split_k_default_segment_count(triton_backend) -> None:
    """Forcing split-K without a segment count still splits (at least two segments) and stays exact."""
    batch = make_batch(BatchSpec(seqs=((600, 1), (40, 1)), group=2, head_dim=64), device=DEVICE)
    split = run_triton(triton_backend, batch, split_k=True)
    assert relative_error(split, reference_attention(*batch.attention_args())) < FP32_TOLERANCE


def test_split_k_heuristic(triton_backend) -> None:
    choose = triton_backend.choose_num_segments
    h100_sms = 132
    # A few long decodes cannot fill the GPU one program per (sequence, KV head): split them.
    assert choose(num_seqs=4, num_kv_heads=8, max_context=8192, decode_only=True, num_sms=h100_sms) > 1
    # Segments never get shorter than SPLIT_K_MIN_SEGMENT keys.
    segments = choose(num_seqs=1, num_kv_heads=1, max_context=2048, decode_only=True, num_sms=h100_sms)
    assert 2048 // segments >= triton_backend.SPLIT_K_MIN_SEGMENT
    # Short contexts, batches with prefill rows, and batches that already fill the GPU take the single pass.
    assert choose(num_seqs=4, num_kv_heads=8, max_context=512, decode_only=True, num_sms=h100_sms) == 1
    assert choose(num_seqs=4, num_kv_heads=8, max_context=8192, decode_only=False, num_sms=h100_sms) == 1
    assert choose(num_seqs=64, num_kv_heads=8, max_context=8192, decode_only=True, num_sms=h100_sms) == 1


def test_output_dtype_follows_query(triton_backend) -> None:
    spec = BatchSpec(seqs=((20, 5), (9, 1)))
    batch = make_batch(spec, cache_dtype=torch.float16, query_dtype=torch.float32, device=DEVICE)
    out = triton_backend.paged_attention(*batch.attention_args())
    assert out.dtype == torch.float32
    assert relative_error(out, reference_attention(*batch.attention_args())) < LOW_PRECISION_TOLERANCE


def test_non_contiguous_query_and_out(triton_backend) -> None:
    """Q sliced out of a fused QKV projection, and an output view with a row stride, are read and written in place."""
    spec = BatchSpec(seqs=((30, 12), (7, 1)), num_kv_heads=2, group=2, head_dim=80)
    batch = make_batch(spec, device=DEVICE)
    num_tokens, num_heads, head_dim = batch.query.shape
    fused = torch.randn(num_tokens, num_heads + 8, head_dim, device=DEVICE)
    fused[:, :num_heads] = batch.query
    batch.query = fused[:, :num_heads]
    out_storage = torch.full((num_tokens, num_heads + 3, head_dim), float("nan"), device=DEVICE)
    out = out_storage[:, 1 : num_heads + 1]
    triton_backend.paged_attention(*batch.attention_args(), out=out)
    assert relative_error(out, reference_attention(*batch.attention_args())) < FP32_TOLERANCE
    assert out_storage[:, 0].isnan().all() and out_storage[:, num_heads + 1 :].isnan().all()


def test_load_backend_returns_a_triton_backend(triton_backend) -> None:
    backend = kernels.load_backend("triton", DEVICE)
    assert isinstance(backend, triton_backend.TritonAttentionBackend) and backend.name == "triton"
    batch = make_batch(BatchSpec(seqs=((12, 12), (5, 1)), group=3, head_dim=64), device=DEVICE)
    out = backend.paged_attention(*batch.attention_args())
    assert relative_error(out, reference_attention(*batch.attention_args())) < FP32_TOLERANCE


def test_length_buckets_keep_similar_lengths_together() -> None:
    members = [10, 11, 12, 13, 14, 15]
    lengths = [300, 12, 150, 40, 290, 5]
    buckets = torch_backend._length_buckets(members, lengths, min_split_work=0)
    assert sorted(m for b in buckets for m in b) == members
    assert buckets == [[10, 14], [12], [13], [11, 15]]  # 300 & 290 | 150 | 40 | 12 & 5 (the fourth takes the rest)
    assert torch_backend._length_buckets([7], [1]) == [[7]]


def test_small_batches_stay_in_one_group() -> None:
    """Below `min_split_work` padded positions (6 x 300 = 1,800 here) one group costs less than four."""
    members, lengths = [10, 11, 12, 13, 14, 15], [300, 12, 150, 40, 290, 5]
    assert torch_backend._length_buckets(members, lengths, min_split_work=1800) == [members]
    assert len(torch_backend._length_buckets(members, lengths, min_split_work=1799)) == 4
