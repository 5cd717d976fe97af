"""What every benchmark figure is recorded with: the CPU model and its vector-ISA flags (/proc/cpuinfo)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> list[str]:
    """The SIMD-relevant flags of this CPU (kernels and GEMMs are only as fast as these allow)."""
    text = _cpuinfo()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "sse4", "amx")))


def cpu_model() -> str:
    text = _cpuinfo()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")


def machine_description() -> str:
    """vCPUs, CPU model and flags, memory: the line every benchmark report starts with."""
    return (f"{len(os.sched_getaffinity(0))} vCPUs ({cpu_model()}; flags {' '.join(cpu_flags())}), "
            f"{psutil.virtual_memory().total / 1024**3:.0f} GiB, no GPU")  # fmt: skip
