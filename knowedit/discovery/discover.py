"""``discover``: score nodes, pick a circuit, measure its faithfulness, return a :class:`Circuit`."""
from __future__ import annotations

from ..circuit.circuit import Circuit, _r, model_info
from ..errors import KnoweditError
from .attribution import attribution_scores
from .curves import mib_areas
from .evaluate import Evaluator
from .patching import patching_scores
from .select import RANKINGS, greedy_prune, ranked, smallest_top_k

METHODS = ("patching", "eap", "eap-ig")
LEVELS = ("node", "edge")


def task_info(task) -> dict:
    meta = {k: v for k, v in task.meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
    return {"name": task.name, "n": len(task), "metric": task.metric, **{k: meta[k] for k in sorted(meta)}}


def node_scores(ev: Evaluator, method: str, steps: int = 5, progress=None) -> dict[str, float]:
    if method == "patching":
        return patching_scores(ev, progress=progress)
    return attribution_scores(ev, method, steps=steps, progress=progress)


def discover(handle, task, method: str = "eap", level: str = "node", ablation: str = "mean",
             target: float = 0.8, prune: bool = True, top_k: int | None = None, rank: str = "abs",
             steps: int = 5, batch_size: int = 32, candidates: str = "heads", mib: bool = False,
             progress=None) -> Circuit:
    """Find the circuit ``handle``'s model uses for ``task``.

    Candidate nodes (every head, with the MLPs always kept, for ``candidates='heads'``; every head and
    MLP for ``'nodes'``) are scored by ``method``; the circuit is the ``top_k`` best (or the
    smallest top-k reaching faithfulness ``target``), then greedily pruned while faithfulness stays
    >= ``target``. ``mib=True`` also measures the MIB faithfulness curves and stores CPR/CMD in
    ``extra['mib']``. (``level='edge'`` is reserved for edge circuits, not built yet.)"""
    if method not in METHODS:
        raise KnoweditError(f"method: {method!r} is unknown; use one of {METHODS}")
    if level not in LEVELS:
        raise KnoweditError(f"level: {level!r} is unknown; use one of {LEVELS}")
    if rank not in RANKINGS:
        raise KnoweditError(f"rank: {rank!r} is unknown; use one of {RANKINGS}")
    if level == "edge":
        # Edge scores need per-head input gradients (q/k/v ports, GQA groups) and edge ablation needs
        # per-destination inputs; neither is built yet, and a node circuit must not pose as an edge one.
        raise KnoweditError("level: 'edge' is not implemented yet in this knowedit; use level='node'")
    ev = Evaluator(handle, task, ablation=ablation, batch_size=batch_size, candidates=candidates)
    scores = node_scores(ev, method, steps, progress)
    order = ranked(scores, rank)
    if top_k is not None:
        if not 0 < top_k <= len(order):
            raise KnoweditError(f"top_k: {top_k} is outside 1..{len(order)}")
        members, f = order[:top_k], ev.faithfulness(order[:top_k])
    else:
        k, f = smallest_top_k(ev, order, target, progress)
        members = order[:k]
    k_top = len(members)
    if prune and target is not None:
        members, f = greedy_prune(ev, members, scores, target, progress)
    settings = {"name": method, "level": level, **ev.reference.settings(), "rank": rank,
                "candidates": candidates, "empty_circuit": "every candidate ablated" +
                (" (all heads; MLPs always kept)" if candidates == "heads" else " (all heads and MLPs)"),
                "selection": ("top-k" if top_k else "smallest top-k reaching target") +
                             (", then greedy pruning to target" if prune else ""),
                "target_faithfulness": target, "top_k": k_top, "batch_size": batch_size,
                "score": "normalised: -(estimated or exact) change of m when the node alone is ablated / (m(N) - m(empty))"}
    if method == "eap-ig":
        settings["ig_steps"] = steps
    threshold = min((abs(scores[n]) if rank == "abs" else scores[n]) for n in members) if members else None
    n_heads = sum(1 for n in members if n.startswith("a"))
    # Fixed nodes (MLPs in heads mode) are part of the circuit: they were never ablated.
    fixed_scores = {n: 0.0 for n in ev.fixed}
    extra = {"m_full": _r(ev.full), "m_empty": _r(ev.empty), "n_heads": n_heads,
             "n_mlps": len(members) - n_heads + len(ev.fixed), "head_share": _r(n_heads / len(handle.all_heads())),
             "all_scores": {n: _r(scores[n]) for n in order}}
    if mib:
        areas = mib_areas(ev, scores, progress=progress)
        extra["mib"] = {"cpr": _r(areas["cpr"]), "cmd": _r(areas["cmd"]), "sizes": areas["sizes"],
                        "cpr_curve": [_r(r["faithfulness"]) for r in areas["cpr_curve"]],
                        "cmd_curve": [_r(r["faithfulness"]) for r in areas["cmd_curve"]],
                        "definition": areas["definition"]}
    return Circuit(model_info(handle), task_info(task), settings, {**fixed_scores, **{n: scores[n] for n in members}}, {},
                   threshold=threshold, faithfulness=f, extra=extra)
