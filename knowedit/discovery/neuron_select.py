"""Choosing MLP neurons from their scores: global top-k, per-layer top-k (the smallest global top-k
reaching a target is :func:`~knowedit.discovery.select.smallest_top_k` on flat indices), greedy refinement (drop blocks of the weakest members while
faithfulness stays at or above the target), and iterative pruning (re-score in the pruned network,
drop the weakest share, repeat)."""
from __future__ import annotations

import torch

from ..errors import KnoweditError

SELECTIONS = ("global", "per-layer", "iterative")


def flat_order(scores: torch.Tensor, rank: str = "abs") -> torch.Tensor:
    """Flat indices ``layer * d_mlp + i`` by decreasing score; ties by index, so runs agree."""
    key = scores.abs().flatten() if rank == "abs" else scores.flatten()
    # stable sort on the negated key keeps index order among equal scores
    return torch.sort(-key.double(), stable=True).indices


def per_layer_top(scores: torch.Tensor, k: int, rank: str = "abs") -> torch.Tensor:
    """Flat indices of the ``k`` best neurons of every layer."""
    L, d = scores.shape
    if not 0 < k <= d:
        raise KnoweditError(f"per_layer_k: {k} is outside 1..{d} (the MLP's width)")
    key = scores.abs() if rank == "abs" else scores
    idx = torch.sort(-key.double(), dim=1, stable=True).indices[:, :k]
    return (idx + torch.arange(L).unsqueeze(1) * d).flatten()


def refine(ev, members: torch.Tensor, target: float, rounds: int = 2, progress=None) -> tuple[torch.Tensor, float]:
    """Greedy refinement: walk the members from the weakest up in blocks (an eighth of the circuit,
    halved each round), dropping a block when faithfulness stays >= ``target``. ``members`` is in
    rank order; the result keeps that order."""
    keep = members.clone()
    f = ev.faithfulness(keep.tolist())
    block = max(1, len(keep) // 8)
    for _ in range(rounds):
        start = len(keep)
        steps = range(start, 0, -block)
        for end in (progress(steps, desc=f"refine (blocks of {block})") if progress else steps):
            lo = max(0, end - block)
            trial = torch.cat([keep[:lo], keep[end:]])
            if len(trial) == 0:
                continue
            ft = ev.faithfulness(trial.tolist())
            if ft >= target:
                keep, f = trial, ft
        if block == 1:
            break
        block = max(1, block // 2)
    return keep, f


def as_layers(flat: torch.Tensor, d_mlp: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for x in flat.tolist():
        out.setdefault(x // d_mlp, []).append(x % d_mlp)
    return {l: sorted(v) for l, v in sorted(out.items())}


def iterative_prune(ev, score_fn, target: float, fraction: float = 0.3, max_rounds: int = 40,
                    progress=None, initial: torch.Tensor | None = None) -> tuple[torch.Tensor, float, list[dict], torch.Tensor]:
    """Iterative attribution pruning: score the neurons still kept *in the network pruned so far*
    (``score_fn(keep) -> [n_layers, d_mlp]``), drop the weakest ``fraction`` of them, and repeat while
    faithfulness stays >= ``target``; the last, failing step is bisected so as few neurons as possible
    stay. One gradient pass and a few evaluations per round, so a 5% circuit of 46,080 neurons takes
    about nine rounds. Returns (kept flat indices, best first by the last scores; faithfulness; history;
    the survival order of every neuron, flat indices best first: kept ones, then the latest dropped,
    within a round by |score| when dropped). ``initial``: the scores of the unpruned network, when the
    caller has them already (the first round's)."""
    if not 0 < fraction < 1:
        raise KnoweditError(f"fraction: {fraction} must be in (0, 1)")
    L, d = ev.n_layers, ev.d_mlp
    keep = torch.ones(L * d, dtype=torch.bool)
    f, history = 1.0, []
    last_scores = None
    dropped_round = torch.full((L * d,), max_rounds + 1, dtype=torch.long)
    dropped_score = torch.zeros(L * d, dtype=torch.float64)
    for rnd in (progress(range(max_rounds), desc="iterative pruning") if progress else range(max_rounds)):
        scores = (initial if rnd == 0 and initial is not None
                  else score_fn({l: keep.view(L, d)[l] for l in range(L)})).flatten()
        last_scores = scores
        dropped_score[keep] = scores[keep].abs().double()
        kept = keep.nonzero().flatten()
        weakest = kept[torch.sort(scores[kept].abs().double(), stable=True).indices]   # ascending |score|
        lo, hi = 0, max(1, int(fraction * len(kept)))
        trial = keep.clone()
        trial[weakest[:hi]] = False
        ft = ev.faithfulness(trial.nonzero().flatten().tolist())
        history.append({"kept": int(trial.sum()), "faithfulness": ft})
        if ft >= target:
            dropped_round[keep & ~trial] = rnd
            keep, f = trial, ft
            continue
        base = keep
        while hi - lo > max(1, len(kept) // 200):   # bisect how many of this round's weakest can go
            mid = (lo + hi) // 2
            trial = base.clone()
            trial[weakest[:mid]] = False
            ft = ev.faithfulness(trial.nonzero().flatten().tolist())
            history.append({"kept": int(trial.sum()), "faithfulness": ft})
            if ft >= target:
                lo, keep, f = mid, trial, ft
            else:
                hi = mid
        dropped_round[base & ~keep] = rnd
        break
    kept = keep.nonzero().flatten()
    kept = kept[torch.sort(-last_scores[kept].abs().double(), stable=True).indices]
    # survival order: later-dropped first, then larger |score| at the time; lexsort via two stable sorts
    order = torch.sort(-dropped_score, stable=True).indices
    order = order[torch.sort(-dropped_round[order], stable=True).indices]
    return kept, f, history, order
