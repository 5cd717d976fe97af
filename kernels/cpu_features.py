"""This CPU's feature flags, read once from /proc/cpuinfo: what the kernels are built for, what dtype the engine
picks, and what every benchmark figure is recorded with."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The feature flags of the first CPU in `cpuinfo` (this machine's by default); [] where there is none (the
    "Features" line is ARM's name for them)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return line.split(":", 1)[1].split() if ":" in line else []


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                "?")  # fmt: skip


def cpu_has_bf16_compute(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16): then bf16 GEMMs beat fp32 ones."""
    flags = cpu_flags(cpuinfo)
    return "avx512_bf16" in flags or "amx_bf16" in flags
