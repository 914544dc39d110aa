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


def report_ratio(title: str, medians: dict, base: str, other: str, budget: str) -> float:
    """Print two medians and their ratio (``other / base``) against a budget; return the ratio."""
    ratio = medians[other] / medians[base]
    width = max(len(base), len(other), len("ratio")) + 2
    print(title)
    for k in (base, other):
        print(f"  {k:<{width}}{medians[k] * 1000:8.1f} ms")
    print(f"  {'ratio':<{width}}{ratio:8.3f}   (budget {budget})")
    return ratio
