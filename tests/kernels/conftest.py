"""Kernel tests: on a CPU-only machine the Triton kernels run in Triton's interpreter.

triton.jit reads TRITON_INTERPRET when a kernel is decorated (and Triton's own library functions are decorated when
triton is first imported), so it is set here, at import time, before anything imports triton or
kernels.triton_backend. With CUDA the tests run the compiled kernels on the GPU instead.
"""

from __future__ import annotations

import os

import pytest
import torch

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
