"""Attribution patching (EAP) and EAP with integrated gradients (EAP-IG) on nodes.

A node's score is the first-order estimate of what ablating it does to the metric:
``Δm(u) ≈ Σ_{prompts, positions} (a_u^ref - a_u^clean) · ∂m/∂a_u`` with the gradient taken on the clean
run (EAP, Nanda 2023; Syed et al. 2023), or averaged over ``steps`` inputs whose embeddings run in a
straight line from the corrupted to the clean prompt (EAP-IG, Hanna et al. 2024). Scores use the same
normalisation and sign as :mod:`~knowedit.discovery.patching`: ``-Δm(u) / (m(N) - m(∅))``.

Gradients are taken with respect to activations only (``torch.autograd.grad``), so no weight gradient
is computed and the model's ``.grad`` fields are never touched. EAP costs one clean forward and one
backward per batch, plus the corrupted forward when ``ablation='patch'``."""
from __future__ import annotations

import torch

from ..errors import KnoweditError
from ..hooks import HookSet
from ..tasks.base import per_prompt_scores
from .evaluate import Evaluator, gradient_metric

METHODS = ("eap", "eap-ig")


def gradient_pass(handle, batch, answers, distractors, metric: str, emb: torch.Tensor | None = None,
                  extra_inputs=None):
    """One forward + backward. Returns ``(acts, grads, metric_sum)`` with ``acts[("z"|"mlp", layer)]``
    the node activations and ``grads`` the metric's gradient with respect to them. ``emb`` replaces
    the embedding output; ``extra_inputs(hookset, store)`` may register more tensors to differentiate."""
    a = handle.adapter
    store: dict = {}

    def embed_hook(mod, args, out):
        out = emb if emb is not None else out
        return out if out.requires_grad else out.detach().requires_grad_()

    def z_hook(l):
        def fn(mod, args):
            store[("z", l)] = args[0]
        return fn

    def mlp_hook(l):
        def fn(mod, args, out):
            store[("mlp", l)] = out
        return fn

    with torch.enable_grad(), HookSet() as hs:
        hs.post(a.embed, embed_hook)
        for l in range(a.n_layers):
            hs.pre(a.o_proj(l), z_hook(l))
            hs.post(a.mlp(l), mlp_hook(l))
        if extra_inputs:
            extra_inputs(hs, store)
        logits = handle.last_logits(batch)
        m = per_prompt_scores(logits.float(), answers, distractors, gradient_metric(metric)).sum()
        keys = list(store)
        grads = torch.autograd.grad(m, [store[k] for k in keys], allow_unused=True)
    acts = {k: store[k].detach() for k in keys}
    grads = {k: (g if g is not None else torch.zeros_like(acts[k])) for k, g in zip(keys, grads)}
    return acts, grads, float(m.detach())


def node_deltas(handle, ref, acts, grads) -> dict[str, torch.Tensor]:
    # float32 whatever the model's dtype: bfloat16 sums over prompts and positions lose the small terms
    a = handle.adapter
    out = {}
    for l in range(a.n_layers):
        z, g = acts[("z", l)].float(), grads[("z", l)].float()
        B, T = z.shape[:2]
        d = ((ref["z"][l].reshape(B, T, -1).float() - z) * g).view(B, T, a.n_heads, a.d_head).sum((0, 1, 3))
        for h in range(a.n_heads):
            out[f"a{l}.h{h}"] = d[h]
        out[f"m{l}"] = ((ref["mlp"][l].float() - acts[("mlp", l)].float()) * grads[("mlp", l)].float()).sum()
    return out


def check_ig_reference(method: str, reference) -> None:
    """EAP-IG's path runs from each corrupted prompt to its clean prompt, so its scores estimate
    patching from those corrupted prompts; multiplying them by (mean - clean) would not be an
    integrated gradient of anything."""
    if method == "eap-ig" and reference.mode != "patch":
        raise KnoweditError("ablation: EAP-IG integrates along the path from each corrupted prompt to its clean "
                            "prompt, so it scores patching from the corrupted counterparts; use ablation='patch' "
                            "(--ablation patch, the default for eap-ig), or method='eap' for mean ablation")


def interpolated_embeddings(handle, batch, corrupt_batch, steps: int):
    """Embedding outputs on the straight line from the corrupted to the clean prompt,
    ``alpha = k / steps`` for ``k = 1 .. steps`` (the last one is the clean prompt)."""
    if corrupt_batch.input_ids.shape != batch.input_ids.shape or not bool((corrupt_batch.lengths == batch.lengths).all()):
        raise KnoweditError("EAP-IG interpolates embeddings between each clean prompt and its corrupted one, "
                            "so each pair needs the same token length; use method='eap' for this task")
    with torch.no_grad():
        e_clean = handle.adapter.embed(batch.input_ids)
        e_corr = handle.adapter.embed(corrupt_batch.input_ids)
    return [e_corr + (k / steps) * (e_clean - e_corr) for k in range(1, steps + 1)]


def attribution_scores(ev: Evaluator, method: str = "eap", steps: int = 5, progress=None) -> dict[str, float]:
    """Normalised node scores from EAP or EAP-IG (``steps`` interpolation points)."""
    if method not in METHODS:
        raise KnoweditError(f"method: {method!r} is not an attribution method; use one of {METHODS}")
    check_ig_reference(method, ev.reference)
    h, task = ev.handle, ev.task
    totals: dict[str, float] = {}
    it = range(len(ev.batches))
    for k in (progress(it, desc=method) if progress else it):
        i, b, ans, dis = ev.batches[k]
        ref = ev.ref(k)
        if method == "eap":
            acts, grads, _ = gradient_pass(h, b, ans, dis, task.metric)
        else:
            cb = h.tokenize(task.corrupt[i:i + len(b)], bos=task.bos)
            embs = interpolated_embeddings(h, b, cb, steps)
            grads = None
            for e in embs:
                acts, g, _ = gradient_pass(h, b, ans, dis, task.metric, emb=e)
                grads = g if grads is None else {key: grads[key] + v for key, v in g.items()}
            grads = {key: v / steps for key, v in grads.items()}
        for n, d in node_deltas(h, ref, acts, grads).items():
            totals[n] = totals.get(n, 0.0) + float(d)
    gap = ev.gap()
    return {n: -(totals[n] / len(task)) / gap for n in ev.nodes}
