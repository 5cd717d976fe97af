"""Timing a benchmark's call: one untimed warm-up, then each repeat's wall time."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after one untimed call (first-touch pages, plans, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` timed calls of `fn` (after a warm-up): what the machine does when undisturbed."""
    return min(timed(fn, repeats))
