"""`dtype: auto` on CPU: bf16 weights where the CPU multiplies bf16 natively, fp32 elsewhere."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from replicas import model_runner
from replicas.config import EngineConfig
from replicas.model_runner import cpu_has_bf16_compute, resolve_dtype


def cpuinfo(*flags: str) -> str:
    return f"processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma {' '.join(flags)}\n"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [((), False), (("avx512f", "avx512bw"), False), (("avx512f", "avx512_bf16"), True), (("amx_tile", "amx_bf16"), True)],
)
def test_bf16_compute_is_read_from_the_cpu_flags(flags: tuple[str, ...], expected: bool) -> None:
    assert cpu_has_bf16_compute(cpuinfo(*flags)) is expected


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_bf16_support(
    monkeypatch: pytest.MonkeyPatch, default_model_dir, has_bf16: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(model_runner, "cpu_has_bf16_compute", lambda: has_bf16)
    config = EngineConfig(model=str(default_model_dir), dtype="auto")
    assert resolve_dtype(config, SimpleNamespace(dtype=torch.float32), "cpu") == expected


def test_explicit_dtype_wins_over_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, default_model_dir) -> None:
    monkeypatch.setattr(model_runner, "cpu_has_bf16_compute", lambda: True)
    config = EngineConfig(model=str(default_model_dir), dtype="float32")
    assert resolve_dtype(config, SimpleNamespace(dtype=torch.float32), "cpu") == torch.float32
