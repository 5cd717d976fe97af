"""Kernel tests: on a CPU-only machine the Triton kernels run in Triton's interpreter.

triton.jit reads TRITON_INTERPRET when a kernel is decorated (and Triton's own library functions are decorated when
triton is first imported), so it is set here, at import time, before anything imports triton or
kernels.triton_backend. With CUDA the tests run the compiled kernels on the GPU instead.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.cpu_features import cpu_flags

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The interpreter is single-threaded Python; more torch threads only contend on a small CI machine.
torch.set_num_threads(2)

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: long-running tests (more hypothesis examples, bigger shapes); skipped by plain pytest, run by make test",
    )


@pytest.fixture(scope="session")
def triton_backend():
    """kernels.triton_backend, failing clearly if its kernels cannot run here."""
    from kernels import triton_backend

    if not torch.cuda.is_available() and not triton_backend.INTERPRETED:
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, so the Triton kernels "
            "were built for a GPU; run with TRITON_INTERPRET=1 in the environment"
        )
    return triton_backend


@pytest.fixture(scope="session")
def cpu_fused_backend():
    """A CpuFusedAttentionBackend, compiling the extension if `make setup` has not (a failed build fails the test)."""
    from kernels.cpu_fused_backend import CpuFusedAttentionBackend

    return CpuFusedAttentionBackend(compile_if_missing=True)


@pytest.fixture(
    scope="session",
    params=["scalar", pytest.param("avx2", marks=pytest.mark.skipif(
        "avx512f" not in cpu_flags(), reason="without AVX-512 the native build is the AVX2 path"))],
)  # fmt: skip
def other_build(request: pytest.FixtureRequest):
    """Builds of the source the native one is not: the portable scalar path (no intrinsics, baseline ISA: what a
    machine without AVX2 compiles) and, on an AVX-512 machine, the AVX2 path (what AVX2-only machines run)."""
    from kernels.cpu_fused_backend import CpuFusedAttentionBackend

    backend = CpuFusedAttentionBackend(variant=request.param, compile_if_missing=True)
    assert backend.simd_path == request.param
    return backend
