"""Collateral effects of an edit on circuit tasks: each task's mean score after the edit minus before.

Task names are resolved through ``knowedit.tasks.get_task`` (ioi, colored-objects, the sequence
tasks, facts) when that registry exists; otherwise only ``ioi`` is available."""
from __future__ import annotations

from ..errors import KnoweditError


def build_task(name: str, tokenizer, n: int = 24, seed: int = 0):
    try:
        from ..tasks import get_task  # the task registry lands with the discovery work
    except ImportError:
        get_task = None
    if get_task is not None:
        return get_task(name, tokenizer, n=n, seed=seed)
    if name != "ioi":
        raise KnoweditError(f"task {name!r}: this knowedit has no task registry yet (knowedit.tasks.get_task); "
                            "only 'ioi' is available")
    from ..tasks import ioi_task
    return ioi_task(tokenizer, n=n, seed=seed)


def task_scores(handle, tasks: dict, batch_size: int = 32) -> dict[str, float]:
    """{task name: mean per-prompt score} under the model's current weights."""
    from ..tasks import score
    return {name: float(score(handle, t, batch_size=batch_size).mean()) for name, t in tasks.items()}


def collateral_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``task_<name>`` (after) and ``task_<name>_delta`` (after - before) per task. The metric of each
    task (logit difference, accuracy, ...) is the task's own, named in the report."""
    out = {}
    for name, b in before.items():
        key = "task_" + name.replace("-", "_")
        out[key] = after[name]
        out[key + "_delta"] = after[name] - b
    return out
