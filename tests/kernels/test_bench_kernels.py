"""bench/kernels.py runs: without a GPU it says so and exits 0; --dry-run exercises the whole script."""

from __future__ import annotations

import pytest
import torch

from bench import kernels as bench_kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark runs for real")
def test_without_a_gpu_it_says_so_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_kernels.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_dry_run_prints_a_row_per_case_and_kernel(triton_backend, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_kernels.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for case in bench_kernels.dry_run_cases():
        assert case.name in out
    assert "write_kv_cache" in out and "copy_blocks" in out
