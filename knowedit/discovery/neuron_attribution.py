"""EAP and EAP-IG on MLP neurons: ``(a_ref - a_clean) · ∂m/∂a`` at the down projection's input gives a
score for every neuron of every layer from the same forward and backward that node EAP uses.

Scores follow the node convention: ``-Δm(u) / (m(N) - m(∅))`` with Δm the first-order change of the
metric when neuron u alone takes its reference value; positive means the neuron helps the task."""
from __future__ import annotations

import contextlib

import torch

from ..errors import KnoweditError
from ..hooks import keep_neurons
from .attribution import METHODS, check_ig_reference, gradient_pass, interpolated_embeddings
from .neuron_evaluate import NeuronEvaluator


def _neuron_inputs(adapter):
    def register(hs, store):
        for l in range(adapter.n_layers):
            hs.pre(adapter.mlp_out(l), (lambda layer: lambda mod, args: store.__setitem__(("neuron", layer), args[0]))(l))
    return register


def neuron_deltas(ref, acts, grads, n_layers: int) -> torch.Tensor:
    """``[n_layers, d_mlp]``: Σ over prompts and positions of (reference − clean) × gradient, in float32."""
    return torch.stack([((ref["neuron"][l].float() - acts[("neuron", l)].float()) * grads[("neuron", l)].float())
                        .sum((0, 1)) for l in range(n_layers)])


def neuron_attribution_scores(ev: NeuronEvaluator, method: str = "eap", steps: int = 5, progress=None,
                              keep: dict | None = None) -> torch.Tensor:
    """Normalised scores ``[n_layers, d_mlp]`` from EAP or EAP-IG (``steps`` interpolation points).

    With ``keep`` (``{layer: bool [d_mlp]}``) the gradients are taken in the pruned network, the neurons
    outside ``keep`` already at their reference values (whose scores are then 0): the scores of the
    remaining neurons given that the others are gone, which iterative pruning needs."""
    if method not in METHODS:
        raise KnoweditError(f"method: {method!r} is not an attribution method; use one of {METHODS}")
    check_ig_reference(method, ev.reference)
    h, task = ev.handle, ev.task
    register = _neuron_inputs(h.adapter)
    total = torch.zeros(ev.n_layers, ev.d_mlp)
    it = range(len(ev.batches))
    for k in (progress(it, desc=f"{method} (neurons)") if progress else it):
        i, b, ans, dis = ev.batches[k]
        ref = ev.ref(k)
        pruned = keep_neurons(h, keep, ref["neuron"]) if keep is not None else contextlib.nullcontext()
        with pruned:
            if method == "eap":
                acts, grads, _ = gradient_pass(h, b, ans, dis, task.metric, extra_inputs=register)
            else:
                cb = h.tokenize(task.corrupt[i:i + len(b)], bos=task.bos)
                grads = None
                for e in interpolated_embeddings(h, b, cb, steps):
                    acts, g, _ = gradient_pass(h, b, ans, dis, task.metric, emb=e, extra_inputs=register)
                    grads = g if grads is None else {key: grads[key] + v for key, v in g.items()}
                grads = {key: v / steps for key, v in grads.items()}
        total += neuron_deltas(ref, acts, grads, ev.n_layers)
    return -(total / len(task)) / ev.gap()


def exact_neuron_scores(ev: NeuronEvaluator, neurons: list[tuple[int, int]], progress=None) -> list[float]:
    """Exact patching of single neurons (one forward per neuron per batch): ``(m(N) - m(N \\ {u})) / gap``."""
    out = []
    for layer, i in (progress(neurons, desc="exact patching") if progress else neurons):
        keep = {l: torch.ones(ev.d_mlp, dtype=torch.bool) for l in range(ev.n_layers)}
        keep[layer][i] = False
        out.append((ev.full - ev.metric(keep)) / ev.gap())
    return out
