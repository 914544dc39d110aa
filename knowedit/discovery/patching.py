"""Exact activation patching on nodes: ablate one head or MLP at a time (one forward per node per
batch, never per prompt) and measure how much of the clean-minus-ablated metric gap it removes.

Convention (noising): the clean run is kept and the node is replaced by its reference activation
(corrupted mean or corrupted counterpart). Score ``= (m(N) - m(N \\ {u})) / (m(N) - m(∅))``: the share
of the full gap lost when ``u`` alone is ablated; positive means the node helps the task."""
from __future__ import annotations

from .evaluate import Evaluator


def patching_scores(ev: Evaluator, nodes=None, progress=None) -> dict[str, float]:
    nodes = list(nodes or ev.nodes)
    sums = dict.fromkeys(nodes, 0.0)
    steps = [(k, n) for k in range(len(ev.batches)) for n in nodes]
    for k, n in (progress(steps, desc="patching") if progress else steps):
        sums[n] += ev.batch_sum(k, [n])
    full, gap = ev.full, ev.gap()
    return {n: (full - s / len(ev.task)) / gap for n, s in sums.items()}
