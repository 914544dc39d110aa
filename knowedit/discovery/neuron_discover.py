"""``discover(..., level='neuron')``: score every MLP neuron, pick a neuron circuit, verify the top
scores by exact patching, and measure faithfulness (also on held-out prompts when given)."""
from __future__ import annotations

import time

import torch

from ..circuit.circuit import Circuit, _r, model_info
from ..errors import KnoweditError
from .neuron_attribution import exact_neuron_scores, neuron_attribution_scores
from .neuron_evaluate import NeuronEvaluator
from .neuron_select import SELECTIONS, as_layers, flat_order, iterative_prune, per_layer_top, refine
from .select import smallest_top_k

NEURON_METHODS = ("eap", "eap-ig")


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else None


def verification(ev, scores: torch.Tensor, order: torch.Tensor, n: int, progress=None) -> dict:
    """Exact single-neuron patching of the ``n`` best-scored neurons: do the estimates hold up?"""
    d = ev.d_mlp
    top = [(int(x) // d, int(x) % d) for x in order[:n]]
    exact = exact_neuron_scores(ev, top, progress)
    est = [float(scores[l, i]) for l, i in top]
    return {"neurons": [f"m{l}.n{i}" for l, i in top], "estimate": [_r(x) for x in est],
            "exact": [_r(x) for x in exact],
            "sign_agreement": _r(sum((x > 0) == (y > 0) for x, y in zip(est, exact)) / max(1, len(top))),
            "spearman": _r(_spearman(est, exact)) if len(top) >= 3 else None}


def discover_neurons(handle, task, method: str = "eap", ablation: str = "mean", target: float | None = 0.8,
                     top_k: int | None = None, per_layer_k: int | None = None, selection: str = "global",
                     prune: bool = True, rank: str = "abs", steps: int = 5, batch_size: int = 32,
                     verify: int = 20, eval_task=None, progress=None) -> Circuit:
    """A neuron circuit: every MLP neuron scored by ``method`` at the down projection's input (heads are
    always kept). ``selection='global'`` takes the ``top_k`` best over all layers, or the smallest global
    top-k reaching faithfulness ``target``; ``'per-layer'`` takes the ``per_layer_k`` best of each layer;
    ``'iterative'`` re-scores in the pruned network and drops the weakest 30% per round down to
    ``target``. ``prune`` then refines greedily towards the target (global and per-layer). ``eval_task`` (other prompts of the same kind)
    gives the held-out faithfulness."""
    if method not in NEURON_METHODS:
        raise KnoweditError(f"method: {method!r} at level 'neuron' is not available; use one of {NEURON_METHODS} "
                            "(exact patching would take one run per neuron: 46,080 on the default model)")
    if selection not in SELECTIONS:
        raise KnoweditError(f"selection: {selection!r} is unknown; use one of {SELECTIONS}")
    if selection == "per-layer" and per_layer_k is None:
        raise KnoweditError("per_layer_k: selection 'per-layer' needs the number of neurons to keep in each layer")
    if target is None and top_k is None and per_layer_k is None:
        raise KnoweditError("target: give a faithfulness target, top_k or per_layer_k")
    t0 = time.perf_counter()
    ev = NeuronEvaluator(handle, task, ablation=ablation, batch_size=batch_size)
    scores = neuron_attribution_scores(ev, method, steps=steps, progress=progress)
    t_scores = time.perf_counter() - t0
    order = flat_order(scores, rank)
    history = f = None
    if selection == "iterative":
        if target is None:
            raise KnoweditError("target: selection 'iterative' prunes down to a faithfulness target; give one")
        members, f, history, survival = iterative_prune(
            ev, lambda keep: neuron_attribution_scores(ev, method, steps=steps, keep=keep), target, progress=progress,
            initial=scores)
        how = "iterative pruning: re-scored in the pruned network, the weakest 30% dropped per round, the last round bisected"
    elif selection == "per-layer":
        members = per_layer_top(scores, per_layer_k, rank)
        # keep global rank order so refinement drops the weakest first
        rank_of = torch.empty_like(order)
        rank_of[order] = torch.arange(len(order))
        members = members[torch.argsort(rank_of[members])]
        how = f"the {per_layer_k} best of each layer"
    elif top_k is not None:
        if not 0 < top_k <= len(order):
            raise KnoweditError(f"top_k: {top_k} is outside 1..{len(order)} (the model's MLP neurons)")
        members, how = order[:top_k], f"global top-{top_k}"
    else:
        k, f = smallest_top_k(ev, order.tolist(), target, progress)
        members, how = order[:k], "smallest global top-k reaching target"
    k_top = len(members)
    if f is None:
        f = ev.faithfulness(members.tolist())
    if prune and target is not None and f >= target and selection != "iterative":
        members, f = refine(ev, members, target, progress=progress)
        how += ", then greedy refinement (blocks of the weakest dropped while faithfulness >= target)"
    d = ev.d_mlp
    chosen = as_layers(members, d)
    neurons = {l: {i: float(scores[l, i]) for i in idx} for l, idx in chosen.items()}
    settings = {"name": method, "level": "neuron", **ev.reference.settings(), "rank": rank,
                "candidates": "MLP neurons (the down projection's inputs); every head always kept",
                "empty_circuit": "every MLP neuron ablated (all heads kept)", "selection": how,
                "target_faithfulness": target, "top_k": k_top, "batch_size": batch_size,
                "score": "normalised: -(estimated change of m when the neuron alone is ablated) / (m(N) - m(empty))"}
    if per_layer_k is not None:
        settings["per_layer_k"] = per_layer_k
    if method == "eap-ig":
        settings["ig_steps"] = steps
    n_all = ev.n_candidates
    extra = {"m_full": _r(ev.full), "m_empty": _r(ev.empty), "n_neurons": len(members),
             "neuron_share": _r(len(members) / n_all), "n_candidate_neurons": n_all,
             "neurons_per_layer": {f"m{l}": len(v) for l, v in chosen.items()},
             "seconds_scoring": _r(t_scores),
             # every neuron's score, per MLP, for fixed-share selections (Circuit.top_neurons)
             "neuron_scores": {f"m{l}": [float(f"{x:.4g}") for x in scores[l].tolist()] for l in range(ev.n_layers)}}
    if history is not None:
        extra["pruning_history"] = [{"kept": x["kept"], "faithfulness": _r(x["faithfulness"])} for x in history]
        # each neuron's rank within its MLP by how long it survived pruning (0 = kept, best scored):
        # what a fixed-share selection from this circuit should follow (Circuit.top_neurons)
        rank = torch.empty(len(survival), dtype=torch.long)
        rank[survival] = torch.arange(len(survival))
        per = rank.view(ev.n_layers, d)
        extra["neuron_rank"] = {f"m{l}": torch.argsort(torch.argsort(per[l])).tolist() for l in range(ev.n_layers)}
    if verify:
        extra["verification"] = verification(ev, scores, order, verify, progress)
    if eval_task is not None:
        held = NeuronEvaluator(handle, eval_task.with_bos(task.bos, handle.tokenizer), ablation=ablation,
                               batch_size=batch_size)
        extra.update({"m_full_heldout": _r(held.full), "m_empty_heldout": _r(held.empty),
                      "faithfulness_heldout": _r(held.faithfulness(chosen)), "n_heldout": len(eval_task)})
    extra["seconds_total"] = _r(time.perf_counter() - t0)
    heads = {c.name: 0.0 for c in handle.all_heads()}
    threshold = min(abs(float(scores[l, i])) for l, idx in chosen.items() for i in idx) if chosen else None
    from .discover import task_info
    return Circuit(model_info(handle), task_info(task, handle), settings, heads, {}, threshold=threshold,
                   faithfulness=f, extra=extra, neurons=neurons)
