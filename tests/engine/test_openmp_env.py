"""OpenMP's wait policy is set before torch loads OpenMP, in every entry point, and never over the user's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

PROBE = (
    "import sys, os; import {module}; "
    "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
)


def probe(module: str, **env: str) -> list[str]:
    clean = {name: value for name, value in os.environ.items() if name not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env={**clean, **env},
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return result.stdout.split()


@pytest.mark.parametrize("module", ["replicas", "bench"])
def test_the_engine_and_the_benchmarks_set_a_bounded_spin_before_torch_loads(module: str) -> None:
    assert probe(module) == ["PASSIVE", "30000", "False"]  # set, and torch (OpenMP) not loaded yet


def test_a_user_setting_is_kept() -> None:
    assert probe("replicas", OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="0")[:2] == ["ACTIVE", "0"]
