"""Choosing a circuit from node scores: the smallest top-k that reaches a target faithfulness,
then greedy pruning (drop the weakest members while faithfulness stays at or above the target)."""
from __future__ import annotations

from ..models.components import parse
from .evaluate import Evaluator

RANKINGS = ("abs", "signed")


def ranked(scores: dict[str, float], by: str = "abs") -> list[str]:
    """Names by decreasing score (``|score|`` with ``by='abs'``); ties in graph order, so runs agree."""
    key = (lambda n: -abs(scores[n])) if by == "abs" else (lambda n: -scores[n])
    return sorted(scores, key=lambda n: (key(n), parse(n).sort_key()))


def smallest_top_k(ev: Evaluator, order: list[str], target: float, progress=None) -> tuple[int, float]:
    """Binary search for the smallest k whose top-k circuit reaches ``target`` (faithfulness is
    treated as monotone in k, which it nearly is for well-ranked nodes)."""
    lo, hi = 0, len(order)
    seen = {hi: 1.0}
    bar = progress(total=max(1, len(order).bit_length()), desc="top-k search") if progress else None
    while lo < hi:
        mid = (lo + hi) // 2
        seen[mid] = ev.faithfulness(order[:mid])
        if seen[mid] >= target:
            hi = mid
        else:
            lo = mid + 1
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    if hi not in seen:
        seen[hi] = ev.faithfulness(order[:hi])
    return hi, seen[hi]


def greedy_prune(ev: Evaluator, members: list[str], scores: dict[str, float], target: float,
                 progress=None) -> tuple[list[str], float]:
    """One pass from the weakest member up: remove it if faithfulness stays >= ``target``."""
    keep = list(members)
    f = ev.faithfulness(keep)
    order = sorted(members, key=lambda n: (abs(scores[n]), parse(n).sort_key()))
    for n in (progress(order, desc="pruning") if progress else order):
        trial = [m for m in keep if m != n]
        ft = ev.faithfulness(trial)
        if ft >= target:
            keep, f = trial, ft
    return keep, f
