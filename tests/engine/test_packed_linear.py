"""Packed Linear weights (`prepack_weights`: MKL's packed sgemm for float32, oneDNN for bfloat16): the same products as
the plain layout, on every CPU model and row count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kernels.cpu_features import cpu_has_bf16_compute
from replicas.models import packed_linear
from replicas.models.packed_linear import PackedLinear, can_prepack, padded_rows, prepack_linears
from replicas import SamplingParams
from tests.engine.helpers import make_engine, random_prompts

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 2048), in_features=st.integers(1, 700), out_features=st.integers(1, 700),
       bias=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_packed_linear_matches_a_float64_reference(
    rows: int, in_features: int, out_features: int, bias: bool, seed: int
) -> None:
    """Any row count, whatever the packing was made for. NOTE: the MKL layer holds a zero stand-in for the plain
    weight, so a call that fell back to the plain path would return the bias alone and fail here."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias_tensor = torch.randn(out_features, generator=generator) if bias else None
    hidden = torch.randn(rows, in_features, generator=generator)
    out = PackedLinear(weight, bias_tensor)(hidden)
    reference = hidden.double() @ weight.double().T + (0 if bias_tensor is None else bias_tensor.double())
    # the sum's magnitude (bias included) bounds its rounding error
    scale = hidden.double().abs() @ weight.double().abs().T + 1e-30
    if bias_tensor is not None:
        scale = scale + bias_tensor.double().abs()
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    assert ((out.double() - reference).abs() / scale).max().item() <= 1e-5 * max(1, in_features**0.5)


@pytest.mark.skipif(not cpu_has_bf16_compute(), reason="bf16 weights are packed only where the CPU multiplies bf16")
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), in_features=st.integers(1, 700), out_features=st.integers(1, 700),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_packed_bf16_linear_matches_a_float64_reference(
    rows: int, in_features: int, out_features: int, seed: int
) -> None:
    """bf16 inputs and weights, products accumulated in fp32, the result rounded once to bf16."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    hidden = torch.randn(rows, in_features, generator=generator).bfloat16()
    out = PackedLinear(weight, bias)(hidden)
    reference = hidden.double() @ weight.double().T + bias.double()
    scale = hidden.double().abs() @ weight.double().abs().T + bias.double().abs() + 1e-30
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    assert ((out.double() - reference).abs() / scale).max().item() <= 2**-8 + 1e-5 * max(1, in_features**0.5)


def test_float32_weights_use_mkls_packing_where_torch_has_mkl() -> None:
    layer = PackedLinear(torch.randn(8, 4), None)
    assert layer.uses_mkl is torch.backends.mkl.is_available()
    assert not PackedLinear(torch.randn(8, 4).bfloat16(), None).uses_mkl


def test_non_contiguous_rows_are_accepted() -> None:
    weight, hidden = torch.randn(32, 48), torch.randn(20, 96)[:, ::2]
    assert torch.allclose(PackedLinear(weight, None)(hidden), hidden @ weight.T, atol=1e-5)


def test_prepacking_replaces_every_linear_and_packs_a_tied_head_separately(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir, prepack_weights=True)
    model = engine.model_runner.model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)  # the lookup keeps the plain table
    plain = make_engine(tiny_llama_dir, prepack_weights=False).model_runner.model
    assert any(isinstance(m, nn.Linear) for m in plain.modules())
    assert prepack_linears(plain) == sum(isinstance(m, PackedLinear) for m in plain.modules())


def test_packed_and_plain_weights_score_prompts_alike(tiny_llama_dir: Path) -> None:
    prompt = random_prompts(1, 40, 40, seed=91)[0]
    logprobs = {}
    for prepack in (True, False):
        engine = make_engine(tiny_llama_dir, prepack_weights=prepack)
        engine.add_request("r", prompt, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0, ignore_eos=True))
        while engine.has_unfinished():
            for output in engine.step():
                if output.finished:
                    logprobs[prepack] = [entry.logprob for entry in output.prompt_logprobs[1:]]
    worst = max(abs(a - b) for a, b in zip(logprobs[True], logprobs[False]))
    assert worst < 1e-4  # the same fp32 products summed in another order


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cpu_float32_is_packed_and_bfloat16_where_the_cpu_multiplies_it(
    monkeypatch: pytest.MonkeyPatch, has_bf16: bool
) -> None:
    monkeypatch.setattr(packed_linear, "cpu_has_bf16_compute", lambda: has_bf16)
    assert can_prepack(torch.device("cpu"), torch.float32)
    assert can_prepack(torch.device("cpu"), torch.bfloat16) is has_bf16
    assert not can_prepack(torch.device("cpu"), torch.float16)
    assert not can_prepack(torch.device("cuda"), torch.float32)



def test_step_sizes_map_to_a_bounded_set_of_padded_row_counts() -> None:
    # oneDNN keeps memory per distinct shape: every step size from 1 to 2,048 rows must share a few of them.
    padded = {rows: padded_rows(rows) for rows in range(1, 2049)}
    assert all(rows <= size < rows + 16 for rows, size in padded.items())
    assert all(size - rows < rows for rows, size in padded.items())  # never more than twice the work
    assert len(set(padded.values())) <= 4 + 2048 // 16
