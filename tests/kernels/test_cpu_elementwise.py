"""The fused CPU elementwise ops (`kernels/csrc/elementwise_cpu.cpp`): RMSNorm (with the residual add), SiLU·mul and
RoPE against a float64 reference in fp32, against the eager ATen chain in bf16 (which they reproduce, rounding where
it rounds), on every build; and the model layers using them where they apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from replicas.models.layers import RMSNorm, RotaryEmbedding, bind_cpu_ops, fused_cpu_ops, silu_and_mul

from .test_attention_kernels import hypothesis_settings

FP32_TOLERANCE = 1e-5
EPS = 1e-5
BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one unit in the last place relative to the value


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm, the chain the fused op replaces."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * hidden.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x.double() * cos.double()[:, None] + rotate_half(x.double()) * sin.double()[:, None]


def cos_sin(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def assert_within_one_bf16_ulp(actual: torch.Tensor, expected: torch.Tensor, max_share: float) -> None:
    """At most one bf16 ulp apart anywhere, and apart at all on at most `max_share` of the elements (the fused
    RMSNorm sums squares in another order than ATen's mean, so a few roundings land the other way)."""
    diff = (actual.float() - expected.float()).abs()
    assert (diff <= BF16_ULP * expected.float().abs() + 1e-30).all()
    assert (actual != expected).float().mean().item() <= max_share


shapes = st.tuples(st.integers(1, 70), st.sampled_from([8, 17, 64, 576]))


@given(shape=shapes, seed=st.integers(0, 2**16))
@hypothesis_settings(max_examples=30)
def test_rms_norm_matches_float64_reference(cpu_fused_backend, shape: tuple[int, int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 3
    weight = 1 + 0.2 * torch.randn(shape[1], generator=generator)
    out = torch.full_like(x, float("nan"))
    cpu_fused_backend.ops.rms_norm(x, weight, EPS, out)
    assert relative(out, rms_norm_reference(x, weight)) <= FP32_TOLERANCE


@given(shape=shapes, seed=st.integers(0, 2**16))
@hypothesis_settings(max_examples=30)
def test_add_rms_norm_updates_the_residual_and_norms_the_sum(cpu_fused_backend, shape: tuple[int, int],
                                                             seed: int) -> None:  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    x, residual = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    weight = 1 + 0.2 * torch.randn(shape[1], generator=generator)
    expected_sum = x + residual
    out = torch.empty_like(x)
    cpu_fused_backend.ops.add_rms_norm(x, residual, weight, EPS, out)
    assert torch.equal(residual, expected_sum)  # one fp32 add: exact
    assert relative(out, rms_norm_reference(expected_sum, weight)) <= FP32_TOLERANCE


@given(rows=st.integers(1, 40), width=st.sampled_from([5, 16, 64, 1536]), seed=st.integers(0, 2**16))
@hypothesis_settings(max_examples=30)
def test_silu_and_mul_matches_float64_reference(cpu_fused_backend, rows: int, width: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    # Wide enough that exp over- and underflows at both ends.
    gate_up = torch.randn(rows, 2 * width, generator=generator) * 30
    out = torch.empty(rows, width)
    cpu_fused_backend.ops.silu_and_mul(gate_up, out)
    gate, up = gate_up.double().chunk(2, dim=-1)
    expected = F.silu(gate) * up
    # Relative to each element's own size where it is not tiny: a silu of a large negative gate is near 0.
    error = (out.double() - expected).abs() / expected.abs().clamp_min(1e-6 * expected.abs().max())
    assert error.max().item() <= FP32_TOLERANCE


@given(tokens=st.integers(1, 40), heads=st.sampled_from([(1, 1), (9, 3), (4, 4)]),
       head_dim=st.sampled_from([8, 64, 96]), seed=st.integers(0, 2**16))  # fmt: skip
@hypothesis_settings(max_examples=30)
def test_rotary_rotates_query_and_key_in_place(cpu_fused_backend, tokens: int, heads: tuple[int, int], head_dim: int,
                                               seed: int) -> None:  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = heads
    # Views of one q|k|v projection, as the attention layer hands them over (row stride > heads x head_dim).
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator)
    query = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    value_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    cos, sin = cos_sin(torch.randint(0, 4096, (tokens,), generator=generator), head_dim, torch.float32)
    expected_query, expected_key = rotary_reference(query, cos, sin), rotary_reference(key, cos, sin)
    cpu_fused_backend.ops.rotary(query, key, cos, sin)
    assert relative(query, expected_query) <= FP32_TOLERANCE
    assert relative(key, expected_key) <= FP32_TOLERANCE
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], value_before)  # v untouched


def test_bf16_ops_reproduce_the_eager_bf16_chain(cpu_fused_backend) -> None:
    """Each op rounds where the eager bf16 chain rounds: RoPE and the residual add give the same bits, RMSNorm and
    SiLU·mul all but a few last-bit differences (the sum's order; exp's last bit)."""
    generator = torch.Generator().manual_seed(0)
    ops = cpu_fused_backend.ops
    x = torch.randn(67, 576, generator=generator).bfloat16()
    residual = torch.randn(67, 576, generator=generator).bfloat16()
    weight = (1 + 0.2 * torch.randn(576, generator=generator)).bfloat16()

    out = torch.empty_like(x)
    ops.rms_norm(x, weight, EPS, out)
    assert_within_one_bf16_ulp(out, rms_norm_eager(x, weight), max_share=0.01)

    expected_sum = x + residual
    summed = residual.clone()
    ops.add_rms_norm(x, summed, weight, EPS, out)
    assert torch.equal(summed, expected_sum)
    assert_within_one_bf16_ulp(out, rms_norm_eager(expected_sum, weight), max_share=0.01)

    gate_up = (torch.randn(67, 2 * 1536, generator=generator) * 4).bfloat16()
    activated = torch.empty(67, 1536, dtype=torch.bfloat16)
    ops.silu_and_mul(gate_up, activated)
    gate, up = gate_up.chunk(2, dim=-1)
    # exp is a polynomial here and Sleef's in ATen: a last-bit difference can move a bf16 rounding, very rarely.
    assert_within_one_bf16_ulp(activated, F.silu(gate) * up, max_share=0.001)

    query = torch.randn(67, 9, 64, generator=generator).bfloat16()
    key = torch.randn(67, 3, 64, generator=generator).bfloat16()
    cos, sin = cos_sin(torch.arange(67) * 31, 64, torch.bfloat16)
    expected_query = query * cos[:, None] + rotate_half(query) * sin[:, None]
    expected_key = key * cos[:, None] + rotate_half(key) * sin[:, None]
    ops.rotary(query, key, cos, sin)
    assert torch.equal(query, expected_query) and torch.equal(key, expected_key)


def test_other_builds_compute_the_same_ops(cpu_fused_backend, other_build) -> None:
    """The AVX2 and portable scalar paths (vector tails included: 17 columns) agree with the native build."""
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(9, 17 * 8, generator=generator).to(dtype)
        weight = torch.randn(17 * 8, generator=generator).to(dtype)
        gate_up = (torch.randn(9, 2 * 17 * 8, generator=generator) * 10).to(dtype)
        results = []
        for ops in (cpu_fused_backend.ops, other_build.ops):
            norm, residual, activated = torch.empty_like(x), x.flip(0).clone(), torch.empty(9, 17 * 8, dtype=dtype)
            ops.add_rms_norm(x, residual, weight, EPS, norm)
            ops.silu_and_mul(gate_up, activated)
            query, key = x.view(9, 17, 8).clone(), x.flip(0).view(9, 17, 8)[:, :3].clone()
            cos, sin = cos_sin(torch.arange(9), 8, dtype)
            ops.rotary(query, key, cos, sin)
            results.append((norm, residual, activated, query, key))
        tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_ULP
        for native, other in zip(*results):
            assert relative(other, native) <= tolerance


def test_ops_reject_what_they_cannot_compute(cpu_fused_backend) -> None:
    ops = cpu_fused_backend.ops
    half = torch.randn(4, 8).half()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(half, torch.ones(8).half(), EPS, torch.empty_like(half))
    with pytest.raises(RuntimeError, match="contiguous in the last"):
        ops.silu_and_mul(torch.randn(16, 4).t(), torch.empty(4, 8))
    with pytest.raises(RuntimeError, match="gate_up is"):
        ops.silu_and_mul(torch.randn(4, 16), torch.empty(4, 7))


def test_layers_use_the_fused_ops_only_where_they_apply(cpu_fused_backend) -> None:
    """Bound modules call the extension for fp32/bf16 CPU tensors and fall back to the eager chain for fp16 (or
    strided rows), with the same results either way."""
    ops = cpu_fused_backend.ops
    assert fused_cpu_ops(ops, torch.randn(2, 4)) is ops
    assert fused_cpu_ops(ops, torch.randn(2, 4).bfloat16()) is ops
    assert fused_cpu_ops(ops, torch.randn(2, 4).half()) is None
    assert fused_cpu_ops(ops, torch.randn(4, 2).t()) is None
    assert fused_cpu_ops(None, torch.randn(2, 4)) is None

    generator = torch.Generator().manual_seed(2)
    norm = RMSNorm(64, EPS)
    norm.weight.data = 1 + 0.1 * torch.randn(64, generator=generator)
    rotary = RotaryEmbedding(type("Config", (), {})(), 16, 128)
    module = torch.nn.ModuleDict({"norm": norm, "rotary": rotary})
    x, residual = torch.randn(5, 64, generator=generator), torch.randn(5, 64, generator=generator)
    gate_up = torch.randn(5, 128, generator=generator)
    positions = torch.tensor([0, 3, 7, 20, 127])
    query, key = torch.randn(5, 4, 16, generator=generator), torch.randn(5, 2, 16, generator=generator)

    def run() -> list[torch.Tensor]:
        normed, summed = norm.add_and_norm(x, residual.clone())
        rotated = rotary(positions, query.clone(), key.clone())
        return [norm(x), normed, summed, silu_and_mul(gate_up, norm.cpu_ops), *rotated]

    assert bind_cpu_ops(module, ops) == 2
    fused = run()
    assert bind_cpu_ops(module, None) == 2
    eager = run()
    for a, b in zip(fused, eager):
        assert relative(a, b) <= FP32_TOLERANCE
