"""Controls for a steering repair: random heads from the same layers, steering to the correct
answer instead of the distractors, and the chosen heads steered on the source task."""
from __future__ import annotations

import random

from .steering import steered_scores


def random_same_layers(handle, heads, seed: int = 0) -> list[str]:
    """As many heads as ``heads``, one from each of their layers, none of them in ``heads``."""
    rng = random.Random(seed)
    chosen = set(heads)
    out = []
    for h in heads:
        layer = handle.component(h).layer
        pool = [c.name for c in handle.all_heads() if c.layer == layer and c.name not in chosen and c.name not in out]
        if pool:
            out.append(rng.choice(pool))
    return out


def correct_answer_steering(handle, task, heads, batch_size: int = 32) -> float:
    """The target metric with ``heads`` steered evenly to the answer token instead."""
    return steered_scores(handle, task, heads, to="answer", batch_size=batch_size).mean().item()


def source_steering(handle, source_task, heads, batch_size: int = 32) -> tuple[float, float]:
    """The source task's metric without and with ``heads`` steered to its distractors (IOI: the S tokens)."""
    base = steered_scores(handle, source_task, [], batch_size=batch_size).mean().item()
    return base, steered_scores(handle, source_task, heads, batch_size=batch_size).mean().item()
