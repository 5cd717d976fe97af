"""The fused CPU kernel (`cpu_fused`) against the float64 reference, beyond what the shared backend tests draw:
larger batches, odd head dims, 16-bit KV caches at fp32 tolerance, thread-count invariance, the portable scalar
build, and how `attention_backend=auto` picks it or falls back."""

from __future__ import annotations

import logging
import subprocess
import sysconfig
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.cpp_extension import include_paths

import kernels
from kernels import cpu_fused_build

from .paged_batches import BatchSpec, batch_specs, make_batch, reference_attention, relative_error
from .test_attention_kernels import FP32_TOLERANCE, hypothesis_settings, run_cpu_fused

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="cpu_fused runs on CPU; the kernel tests use CUDA")


CACHE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def fused_specs(draw: st.DrawFn, max_seqs: int = 12, max_seq_len: int = 600) -> BatchSpec:
    """Mixes of prefill chunks and decodes, bigger than the interpreter-bound shared tests, with odd head dims."""
    spec = draw(batch_specs(max_seqs=max_seqs, max_seq_len=max_seq_len, max_new_tokens=1200))
    head_dim = draw(st.sampled_from((64, 128, 80, 67, 8)))  # 67: every SIMD loop's scalar tail
    return replace(spec, head_dim=head_dim)


@given(spec=fused_specs())
@hypothesis_settings(max_examples=60)
def test_fp32_matches_reference(cpu_fused_backend, spec: BatchSpec) -> None:
    batch = make_batch(spec)  # unowned slots hold NaN: any read outside a sequence's blocks shows
    error = relative_error(run_cpu_fused(cpu_fused_backend, batch), reference_attention(*batch.attention_args()))
    assert error <= FP32_TOLERANCE


@given(spec=fused_specs(max_seqs=6, max_seq_len=300), cache_dtype=st.sampled_from([torch.bfloat16, torch.float16]))
@hypothesis_settings(max_examples=30)
def test_16_bit_kv_cache_is_read_exactly_into_fp32(cpu_fused_backend, spec: BatchSpec, cache_dtype) -> None:
    """The reference reads the same 16-bit values (widened exactly), so the fp32 tolerance holds."""
    batch = make_batch(spec, cache_dtype=cache_dtype)
    error = relative_error(run_cpu_fused(cpu_fused_backend, batch), reference_attention(*batch.attention_args()))
    assert error <= FP32_TOLERANCE


@given(spec=fused_specs(max_seqs=6, max_seq_len=300), cache_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
@hypothesis_settings(max_examples=20)
def test_bf16_query_is_read_and_written_in_bf16_with_the_fp32_paths_result(cpu_fused_backend, spec: BatchSpec,
                                                                           cache_dtype) -> None:  # fmt: skip
    """A bf16 model's queries go into the kernel as bf16 and come out as bf16: the same bits as widening the query
    to fp32, attending into an fp32 output and rounding that to bf16 (the path with conversion passes around it)."""
    batch = make_batch(spec, cache_dtype=cache_dtype, query_dtype=torch.bfloat16)
    direct = cpu_fused_backend.paged_attention(*batch.attention_args())
    widened = torch.full(batch.query.shape, float("nan"), dtype=torch.float32)
    through_fp32 = cpu_fused_backend.paged_attention(*batch.attention_args(), out=widened)
    assert direct.dtype == torch.bfloat16 and torch.equal(direct, through_fp32)
    assert torch.equal(through_fp32, widened.to(torch.bfloat16))


def test_long_prefill_chunk_over_many_query_tiles(cpu_fused_backend) -> None:
    """A chunk far longer than a query tile, after a cached prefix, next to decodes, with GQA 3 (the default model)."""
    spec = BatchSpec(seqs=((1500, 700), (900, 1), (3, 1), (64, 64)), num_kv_heads=3, group=3, head_dim=64)
    batch = make_batch(spec)
    error = relative_error(run_cpu_fused(cpu_fused_backend, batch), reference_attention(*batch.attention_args()))
    assert error <= FP32_TOLERANCE


def test_sliding_window_shorter_than_a_block(cpu_fused_backend) -> None:
    spec = BatchSpec(seqs=((200, 50), (77, 1)), num_kv_heads=2, group=4, head_dim=64, block_size=16, sliding_window=3)
    batch = make_batch(spec)
    error = relative_error(run_cpu_fused(cpu_fused_backend, batch), reference_attention(*batch.attention_args()))
    assert error <= FP32_TOLERANCE


def test_output_does_not_depend_on_the_thread_count(cpu_fused_backend) -> None:
    """Each (sequence, query tile, KV head) is computed whole by one thread: bitwise the same with 1 or 2 threads."""
    batch = make_batch(BatchSpec(seqs=((300, 120), (90, 1), (250, 1), (40, 40)), num_kv_heads=2, group=3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_cpu_fused(cpu_fused_backend, batch)
        torch.set_num_threads(2)
        two = run_cpu_fused(cpu_fused_backend, batch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_strided_query_rows_are_read_in_place(cpu_fused_backend) -> None:
    """Q sliced out of a fused QKV projection (row stride larger than the row)."""
    spec = BatchSpec(seqs=((30, 12), (7, 1)), num_kv_heads=2, group=2, head_dim=80)
    batch = make_batch(spec)
    num_tokens, num_heads, head_dim = batch.query.shape
    fused = torch.randn(num_tokens, num_heads + 4, head_dim)
    fused[:, :num_heads] = batch.query
    batch.query = fused[:, :num_heads]
    error = relative_error(run_cpu_fused(cpu_fused_backend, batch), reference_attention(*batch.attention_args()))
    assert error <= FP32_TOLERANCE


def test_rejects_mismatched_head_counts(cpu_fused_backend) -> None:
    batch = make_batch(BatchSpec(seqs=((10, 1),), num_kv_heads=2, group=2))
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        cpu_fused_backend.paged_attention(batch.query[:, :3], *batch.attention_args()[1:])


@pytest.mark.slow
@given(spec=fused_specs(max_seqs=6, max_seq_len=300), cache_dtype=st.sampled_from(CACHE_DTYPES))
@hypothesis_settings(max_examples=25)
def test_other_builds_match_reference(other_build, spec: BatchSpec, cache_dtype) -> None:
    batch = make_batch(spec, cache_dtype=cache_dtype)
    error = relative_error(run_cpu_fused(other_build, batch), reference_attention(*batch.attention_args()))
    assert error <= FP32_TOLERANCE


def test_avx512_path_compiles() -> None:
    """On a machine without AVX-512 the AVX-512 section must at least compile (an AVX2 intrinsic slipped into it
    once); AVX-512 machines run it."""
    includes = [arg for path in [*include_paths(), sysconfig.get_paths()["include"]] for arg in ("-isystem", path)]
    for source in cpu_fused_build.SOURCES:
        command = ["g++", "-std=c++20", "-fsyntax-only", "-march=skylake-avx512", "-fopenmp",
                   "-DPAGED_CPU_LIBRARY=avx512", *includes, str(source)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{source.name}: {result.stderr[-2000:]}"


def test_auto_picks_cpu_fused_on_cpu_when_built(cpu_fused_backend) -> None:
    assert cpu_fused_build.is_built()
    assert kernels.resolve_backend_name("auto", "cpu") == "cpu_fused"
    assert kernels.load_backend("auto", "cpu").name == "cpu_fused"


def test_auto_falls_back_to_torch_with_one_warning_when_not_built(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    monkeypatch.setattr(cpu_fused_build, "BUILD_ROOT", tmp_path)  # no build there
    monkeypatch.setattr(cpu_fused_build, "_loaded", set())  # as in a fresh process
    monkeypatch.setattr(kernels, "_warned_fallback", False)
    with caplog.at_level(logging.WARNING, logger="kernels"):
        first, second = kernels.load_backend("auto", "cpu"), kernels.load_backend("auto", "cpu")
    assert first.name == second.name == "torch"
    warnings = [r for r in caplog.records if "PyTorch backend" in r.getMessage()]
    assert len(warnings) == 1 and "make setup" in warnings[0].getMessage()


def test_cpu_fused_refuses_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="runs on CPU"):
        kernels.load_backend("cpu_fused", "cuda")
