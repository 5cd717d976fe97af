"""The Triton kernels compile for a CUDA GPU (sm_90), checked without one: see cuda_compile.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other kernel tests run compiled")


def run_cuda_compile(*args: str) -> None:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.cuda_compile", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kernels_compile_for_h100() -> None:
    run_cuda_compile()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about a hundred compiles on a small machine
def test_every_dtype_head_dim_and_group_compiles_for_a100_and_h100() -> None:
    run_cuda_compile("--all", "--arch", "80", "--arch", "90")
