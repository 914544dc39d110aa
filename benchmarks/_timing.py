"""Shared timing helper for the benchmarks: medians of interleaved repeats, so drift on a noisy
machine hits both sides of a ratio alike."""
from __future__ import annotations

import statistics
import time


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 1) -> dict:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
