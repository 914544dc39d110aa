"""Overlap between two circuits, with the selection settings that made them (a share of shared
heads means little without the thresholds behind it)."""
from __future__ import annotations


def circuit_overlap(a, b, kind: str = "head") -> dict:
    """:meth:`Circuit.overlap` (Jaccard; share of the union's heads present in both, Merullo et al.'s
    statistic) plus each circuit's task, threshold, target faithfulness and faithfulness."""
    out = a.overlap(b, kind)
    for tag, c in (("a", a), ("b", b)):
        out[f"task_{tag}"] = c.task.get("name")
        out[f"threshold_{tag}"] = c.threshold
        out[f"target_{tag}"] = c.method.get("target_faithfulness")
        out[f"faithfulness_{tag}"] = c.faithfulness
    return out
