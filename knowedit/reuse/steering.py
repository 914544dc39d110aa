"""Steer heads to the distractors at the answer position, score the target task, rank heads by the
gain each gives alone, and choose a set (greedy or top-k)."""
from __future__ import annotations

import pandas as pd
import torch

from ..errors import KnoweditError
from ..hooks import even_over, steer_attention
from ..tasks.base import score

TO = ("distractors", "answer")


def target_positions(task, to: str = "distractors") -> list[list[int]]:
    """Per-prompt key positions the steered heads attend to: the distractors (the repair) or the
    answer (the correct-colour control)."""
    if to not in TO:
        raise KnoweditError(f"to: {to!r} is not one of {TO}")
    if to == "distractors":
        if not task.distractor_positions:
            raise KnoweditError(f"task {task.name!r} has no distractor_positions; steering needs the positions of the "
                                f"distractor tokens (use a task generator that records them, e.g. colored-objects, ioi)")
        return task.distractor_positions
    pos = (task.positions or {}).get("answer")
    if not pos:
        raise KnoweditError(f"task {task.name!r} has no positions['answer']; the correct-answer control needs them")
    return pos


def steering_intervention(handle, task, heads, to: str = "distractors"):
    """``intervention(batch, slice)`` for :func:`knowedit.tasks.score`: each head attends evenly to the
    chosen positions at each prompt's last token."""
    positions = target_positions(task, to)

    def intervention(batch, sl):
        dist = even_over(positions[sl], batch.input_ids.shape[1])
        return steer_attention(handle, {h: dist for h in heads}, batch.last)
    return intervention


def steered_scores(handle, task, heads, to: str = "distractors", batch_size: int = 32) -> torch.Tensor:
    """Per-prompt metric with ``heads`` steered (no heads: the unsteered model)."""
    if not heads:
        return score(handle, task, batch_size=batch_size)
    return score(handle, task, batch_size=batch_size, intervention=steering_intervention(handle, task, heads, to))


def rank_heads(handle, task, candidates, baseline: float | None = None, batch_size: int = 32,
               progress=None) -> pd.DataFrame:
    """Each candidate steered alone: ``component, metric, gain``, best first."""
    base = steered_scores(handle, task, [], batch_size=batch_size).mean().item() if baseline is None else baseline
    rows = []
    for h in (progress(candidates, desc="heads alone") if progress else candidates):
        m = steered_scores(handle, task, [h], batch_size=batch_size).mean().item()
        rows.append({"component": h, "metric": m, "gain": m - base})
    df = pd.DataFrame(rows, columns=["component", "metric", "gain"])
    df = df.sort_values("gain", ascending=False, kind="stable").reset_index(drop=True)
    df.attrs["baseline"] = base
    return df


def choose_heads(handle, task, ranking: pd.DataFrame, method: str = "greedy", k: int = 4, pool: int = 6,
                 batch_size: int = 32, progress=None) -> tuple[list[str], float]:
    """The chosen set and its metric. ``topk``: the ``k`` best single heads with a positive gain.
    ``greedy``: from the ``pool`` best positive heads, add the one that helps the set most, while it
    helps, up to ``k`` heads."""
    if method not in ("greedy", "topk"):
        raise KnoweditError(f"method: {method!r} is not 'greedy' or 'topk'")
    base = ranking.attrs.get("baseline")
    positive = list(ranking[ranking["gain"] > 0]["component"])
    if not positive:
        return [], base
    if method == "topk":
        chosen = positive[:k]
        return chosen, steered_scores(handle, task, chosen, batch_size=batch_size).mean().item()
    chosen, best = [positive[0]], float(ranking["metric"].iloc[0])
    rest = positive[1:pool]
    while rest and len(chosen) < k:
        trials = {h: steered_scores(handle, task, chosen + [h], batch_size=batch_size).mean().item()
                  for h in (progress(rest, desc=f"greedy {len(chosen) + 1}") if progress else rest)}
        h = max(trials, key=trials.get)
        if trials[h] <= best:
            break
        chosen.append(h)
        best = trials[h]
        rest.remove(h)
    return chosen, best
