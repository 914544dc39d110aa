"""``discover``: score nodes, pick a circuit, measure its faithfulness, return a :class:`Circuit`."""
from __future__ import annotations

from ..circuit.circuit import Circuit, _r, model_info
from ..errors import KnoweditError
from .attribution import attribution_scores
from .curves import mib_areas
from .edge_attribution import edge_attribution_scores
from .edge_evaluate import EdgeEvaluator
from .evaluate import Evaluator
from .neuron_discover import discover_neurons
from .patching import patching_scores
from .select import RANKINGS, greedy_prune, ranked, smallest_top_k

METHODS = ("patching", "eap", "eap-ig")
LEVELS = ("node", "edge", "neuron")


PROTOCOLS = ("knowedit", "mib")


def task_info(task, handle) -> dict:
    meta = {k: v for k, v in task.meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if isinstance(task.meta.get("relations"), list):   # which relations a facts task drew from
        meta["relations"] = sorted(map(str, task.meta["relations"]))
    # after the generator's meta: a split task (the MIB protocol) has fewer prompts than it generated
    return {"name": task.name, "metric": task.metric, **{k: meta[k] for k in sorted(meta)}, "n": len(task),
            "bos": handle.uses_bos(task.bos)}


def node_scores(ev: Evaluator, method: str, steps: int = 5, progress=None) -> dict[str, float]:
    if method == "patching":
        return patching_scores(ev, progress=progress)
    return attribution_scores(ev, method, steps=steps, progress=progress)


def select(ev, order: list[str], target: float, top_k: int | None, progress=None) -> tuple[list[str], float]:
    """The ``top_k`` best, or the smallest top-k reaching ``target``; with its faithfulness."""
    if top_k is not None:
        if not 0 < top_k <= len(order):
            raise KnoweditError(f"top_k: {top_k} is outside 1..{len(order)}")
        return order[:top_k], ev.faithfulness(order[:top_k])
    k, f = smallest_top_k(ev, order, target, progress)
    return order[:k], f


def mib_record(ev, scores: dict[str, float], protocol: str, progress=None) -> dict:
    """CPR/CMD with the protocol they were measured under (they are only comparable within one)."""
    areas = mib_areas(ev, scores, progress=progress, floor=protocol.startswith("mib"))
    out = {"protocol": protocol, "cpr": _r(areas["cpr"]), "cmd": _r(areas["cmd"]), "sizes": areas["sizes"],
           "cpr_curve": [_r(r["faithfulness"]) for r in areas["cpr_curve"]],
           "cmd_curve": [_r(r["faithfulness"]) for r in areas["cmd_curve"]], "definition": areas["definition"]}
    if "kept" in areas["cpr_curve"][0]:
        out["cpr_kept"] = [r["kept"] for r in areas["cpr_curve"]]
        out["cmd_kept"] = [r["kept"] for r in areas["cmd_curve"]]
    return out


def knowedit_protocol(level: str, candidates: str, ablation: str) -> str:
    what = {"heads": "heads only (MLPs always kept)", "nodes": "heads and MLPs"}.get(candidates, candidates)
    if level == "edge":
        what = "edges between heads and MLPs (the embedding's edges always kept)"
    return (f"knowedit: {what}, {ablation} ablation, curves on the same prompts that scored them (in-sample); "
            "not comparable with the MIB leaderboard")


def default_ablation(method: str, ablation: str | None) -> str:
    """Mean ablation for EAP and patching; counterfactual patching for EAP-IG (its path ends there)."""
    if ablation is not None:
        return ablation
    return "patch" if method == "eap-ig" else "mean"


def discover(handle, task, method: str = "eap", level: str | None = None, ablation: str | None = None,
             target: float = 0.8, prune: bool = True, top_k: int | None = None, rank: str = "abs",
             steps: int = 5, batch_size: int = 32, candidates: str = "heads", mib: bool = False,
             protocol: str = "knowedit", eval_task=None, bos: bool | None = None, progress=None,
             per_layer_k: int | None = None, selection: str = "global", verify: int = 20) -> Circuit:
    """Find the circuit ``handle``'s model uses for ``task``.

    Candidate nodes (every head, with the MLPs always kept, for ``candidates='heads'``; every head and
    MLP for ``'nodes'``) are scored by ``method``; the circuit is the ``top_k`` best (or the
    smallest top-k reaching faithfulness ``target``), then greedily pruned while faithfulness stays
    >= ``target``. ``mib=True`` also measures the MIB faithfulness curves and stores CPR/CMD in
    ``extra['mib']``. ``level='edge'`` scores and selects edges instead (see :func:`discover_edges`).

    ``ablation`` defaults to mean ablation (per template), or to counterfactual patching for EAP-IG.
    ``protocol='mib'`` follows MIB's circuit track: edges (the embedding's included) scored with
    counterfactual patching on ``task``, circuits pruned after top-n, and the curves (always measured)
    on ``eval_task`` (default: ``task`` split in two, the first half scoring, the second half curves).
    ``bos`` runs the prompts with or without the model's BOS token (None: the model's convention).

    ``level='neuron'`` scores every MLP neuron (``m7.n123``) with EAP or EAP-IG, heads always kept, and
    selects globally (``top_k`` or the smallest top-k reaching ``target``) or per layer
    (``selection='per-layer'``, ``per_layer_k``); ``verify`` top neurons are re-measured by exact
    patching; ``eval_task`` gives the held-out faithfulness (see :func:`discover_neurons`)."""
    if method not in METHODS:
        raise KnoweditError(f"method: {method!r} is unknown; use one of {METHODS}")
    if protocol not in PROTOCOLS:
        raise KnoweditError(f"protocol: {protocol!r} is unknown; use one of {PROTOCOLS}")
    if protocol == "mib":
        if level not in (None, "edge"):
            raise KnoweditError("level: the MIB protocol scores edges; leave level out or use level='edge'")
        if ablation not in (None, "patch"):
            raise KnoweditError("ablation: the MIB protocol uses counterfactual patching; leave ablation out or "
                                "use ablation='patch'")
        level, ablation = "edge", "patch"
    level = level or "node"
    if level not in LEVELS:
        raise KnoweditError(f"level: {level!r} is unknown; use one of {LEVELS}")
    if rank not in RANKINGS:
        raise KnoweditError(f"rank: {rank!r} is unknown; use one of {RANKINGS}")
    ablation = default_ablation(method, ablation)
    task = task.with_bos(bos, handle.tokenizer)
    if level == "neuron":
        return discover_neurons(handle, task, method, ablation, target, top_k, per_layer_k, selection, prune,
                                rank, steps, batch_size, verify, eval_task, progress)
    if level == "edge":
        if method == "patching":
            raise KnoweditError("method: 'patching' at level 'edge' would take one run per edge (over 100k on "
                                "the default model); use method='eap' or 'eap-ig' for edges")
        return discover_edges(handle, task, method, ablation, target, top_k, rank, steps, batch_size, mib,
                              progress, protocol, eval_task)
    ev = Evaluator(handle, task, ablation=ablation, batch_size=batch_size, candidates=candidates)
    scores = node_scores(ev, method, steps, progress)
    order = ranked(scores, rank)
    members, f = select(ev, order, target, top_k, progress)
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
        extra["mib"] = mib_record(ev, scores, knowedit_protocol(level, candidates, ablation), progress)
    return Circuit(model_info(handle), task_info(task, handle), settings, {**fixed_scores, **{n: scores[n] for n in members}}, {},
                   threshold=threshold, faithfulness=f, extra=extra)


# An edge circuit file keeps the circuit's edges and this many of the best-scored candidates.
TOP_EDGE_SCORES = 2000


def split_task(task, eval_task):
    """(scoring prompts, curve prompts): ``eval_task``, or the two halves of ``task``."""
    if eval_task is not None:
        return task, eval_task
    if len(task) < 2:
        raise KnoweditError("task: the MIB protocol scores on one half of the prompts and measures the curves on "
                            "the other; give at least 2 prompts (or pass eval_task)")
    half = len(task) // 2
    return task.subset(range(half)), task.subset(range(half, len(task)))


def discover_edges(handle, task, method: str, ablation: str, target: float, top_k: int | None, rank: str,
                   steps: int, batch_size: int, mib: bool, progress=None, protocol: str = "knowedit",
                   eval_task=None) -> Circuit:
    """Edge-level discovery: EAP or EAP-IG edge scores, then the top-k edges (or the smallest top-k
    reaching ``target``). No greedy pruning: it would cost one run per member edge. Under the MIB
    protocol every edge set is pruned as MIB prunes it, and the curves use held-out prompts."""
    is_mib = protocol == "mib"
    if is_mib:
        task, eval_task = split_task(task, eval_task)
        eval_task = eval_task.with_bos(task.bos, handle.tokenizer)
    ev = EdgeEvaluator(handle, task, ablation=ablation, batch_size=batch_size, emb=is_mib, prune=is_mib)
    scores = edge_attribution_scores(ev, method, steps=steps, progress=progress)
    order = ranked(scores, rank)
    members, f = select(ev, order, target, top_k, progress)
    k_top = len(members)
    if is_mib:
        members = ev.kept(members)
    settings = {"name": method, "level": "edge", **ev.reference.settings(), "rank": rank,
                "candidates": "edges between heads (q/k/v inputs) and MLPs, and into the logits; the "
                              "embedding's edges always kept",
                "empty_circuit": "every candidate edge ablated",
                "selection": "top-k" if top_k else "smallest top-k reaching target",
                "target_faithfulness": target, "top_k": k_top, "batch_size": batch_size,
                "score": "normalised: -(estimated change of m when the edge alone is ablated) / (m(N) - m(empty))"}
    if is_mib:
        settings.update({"protocol": "mib", "candidates": "edges from the embedding, heads (into q/k/v inputs) "
                         "and MLPs, into later heads, MLPs and the logits", "selection": settings["selection"] +
                         ", then pruned as MIB prunes (nodes without kept inputs or outputs dropped)",
                         "split": {"scoring": len(task), "curves": len(eval_task)}})
    if method == "eap-ig":
        settings["ig_steps"] = steps
    threshold = min((abs(scores[n]) if rank == "abs" else scores[n]) for n in members) if members else None
    edges = {n: scores[n] for n in members}
    probe = Circuit(model_info(handle), task_info(task, handle), settings, {}, edges)
    heads = probe.heads()
    extra = {"m_full": _r(ev.full), "m_empty": _r(ev.empty), "n_edges": len(members),
             "n_candidate_edges": len(order), "edge_share": _r(len(members) / len(order)),
             "n_heads": len(heads), "n_mlps": len(probe.mlps()), "head_share": _r(len(heads) / len(handle.all_heads())),
             "top_scores": {n: _r(scores[n]) for n in order[:TOP_EDGE_SCORES]}}
    if is_mib:
        held = EdgeEvaluator(handle, eval_task, ablation=ablation, batch_size=batch_size, emb=True, prune=True)
        extra.update({"m_full_heldout": _r(held.full), "m_empty_heldout": _r(held.empty),
                      "faithfulness_heldout": _r(held.faithfulness(members))})
        extra["mib"] = mib_record(held, scores, f"mib: edges including the embedding's, counterfactual patching, "
                                  f"scores from {len(task)} prompts, curves on {len(eval_task)} others, pruned "
                                  "after top-n, k = int(size x candidates)", progress)
    elif mib:
        extra["mib"] = mib_record(ev, scores, knowedit_protocol("edge", "edges", ablation), progress)
    return Circuit(model_info(handle), task_info(task, handle), settings, {}, edges, threshold=threshold, faithfulness=f,
                   extra=extra)
