"""Shared by the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_times(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best-of-N wall time of two functions, interleaved so that machine noise hits both."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]
