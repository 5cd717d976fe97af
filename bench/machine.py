"""What every benchmark figure is recorded with: the CPU model and its vector-ISA flags (/proc/cpuinfo)."""

from __future__ import annotations

import os

import psutil

from kernels.cpu_features import cpu_flags as all_cpu_flags
from kernels.cpu_features import cpu_model


def cpu_flags() -> list[str]:
    """The SIMD-relevant flags of this CPU (kernels and GEMMs are only as fast as these allow)."""
    return sorted(f for f in all_cpu_flags() if f.startswith(("avx", "fma", "f16c", "sse4", "amx")))


def machine_description() -> str:
    """vCPUs, CPU model and flags, memory: the line every benchmark report starts with."""
    return (f"{len(os.sched_getaffinity(0))} vCPUs ({cpu_model()}; flags {' '.join(cpu_flags())}), "
            f"{psutil.virtual_memory().total / 1024**3:.0f} GiB, no GPU")  # fmt: skip
