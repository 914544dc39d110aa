"""Attribution patching on edges (EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024).

The score of an edge ``u -> v`` is the first-order estimate of what replacing, in ``v``'s input
only, ``u``'s output by its reference value does to the metric:
``Δm(u->v) ≈ Σ_{prompts, positions} (o_u^ref - o_u^clean) · ∂m/∂in_v``, where ``o_u`` is what ``u`` writes
to the residual stream and ``in_v`` the residual stream as destination ``v`` reads it (before its
norm). ``∂m/∂in_v`` differs per destination even inside one layer, because each head reads the
shared stream through its own q/k/v slice: it is ``J_normᵀ W_vᵀ ∂m/∂(v's port)``, computed for every
port of a layer at once with one batched vector-Jacobian product through the layer's norm.

Scores use the node scores' normalisation and sign: ``-Δm / (m(N) - m(∅))``. Per batch EAP costs one
forward without gradients (the clean outputs) and one forward + backward (the gradients); EAP-IG
takes the gradients at ``steps`` inputs interpolated from the corrupted to the clean embeddings.
"""
from __future__ import annotations

import torch

from ..hooks import HookSet
from ..hooks.ports import PORTS, head_ports, port_weight
from ..tasks.base import per_prompt_scores
from .attribution import check_ig_reference, interpolated_embeddings
from .edge_graph import EdgeGraph
from .evaluate import gradient_metric


def head_outputs(adapter, layer: int, z: torch.Tensor) -> torch.Tensor:
    """What each head of ``layer`` writes to the residual stream, ``[H, B, T, d_model]``, from the
    W_O input ``z`` (``[B, T, H*dh]`` or ``[B, T, H, dh]``)."""
    H, dh = adapter.n_heads, adapter.d_head
    # float32 whatever the model's dtype: these outputs are differenced and summed over many edges
    w = adapter.weight_in_out(adapter.o_proj(layer)).reshape(H, dh, -1).float()
    return torch.einsum("bthe,hed->hbtd", z.reshape(*z.shape[:2], H, dh).float(), w)


def source_outputs(adapter, z: dict, mlp: dict, emb: torch.Tensor | None = None) -> torch.Tensor:
    """``[n_sources, B, T, d]`` float32 in the edge graph's source order, from per-layer z and MLP
    outputs (and the embedding stream first, when the graph has the embedding as a source)."""
    out = [emb.unsqueeze(0).float()] if emb is not None else []
    for l in range(adapter.n_layers):
        out += [head_outputs(adapter, l, z[l]), mlp[l].unsqueeze(0).float()]
    return torch.cat(out)


@torch.no_grad()
def clean_sources(handle, batch, emb: bool = False) -> torch.Tensor:
    a = handle.adapter
    z, mlp, x0 = {}, {}, {}
    with HookSet() as hs:
        hs.pre(a.ln_attn(0), lambda m, args: x0.setdefault(0, args[0]))
        for l in range(a.n_layers):
            hs.pre(a.o_proj(l), lambda m, args, l=l: z.__setitem__(l, args[0]))
            hs.post(a.mlp(l), lambda m, args, o, l=l: mlp.__setitem__(l, o))
        handle.last_logits(batch)
    return source_outputs(a, z, mlp, x0[0] if emb else None)


def _norm_vjp(norm, x: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``J_norm(x)ᵀ g`` for each ``g`` in ``grads [P, B, T, d]``: one batched backward through the norm,
    in the model's dtype (the norm's own), returned as float32."""
    with torch.enable_grad():
        xr = x.detach().unsqueeze(0).expand(grads.shape).clone().requires_grad_(True)
        return torch.autograd.grad(norm(xr), xr, grads.to(x.dtype))[0].float()


def gradient_terms(handle, batch, answers, distractors, metric: str, D: torch.Tensor, graph: EdgeGraph,
                   emb: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_{b,t} D_u · ∂m/∂in_v`` for every (destination v, source u), ``[n_dests, n_sources]``
    (entries for invalid pairs are garbage and ignored). ``D``: source output changes ``[U, B, T, d]``."""
    a = handle.adapter
    st: dict = {"port": {}, "mlp_in": {}, "x": {}, "mid": {}}

    def embed_hook(mod, args, out):
        out = emb if emb is not None else out
        return out if out.requires_grad else out.detach().requires_grad_()

    def on_port(layer, port, x):
        st["port"][(layer, port)] = x

    with torch.enable_grad(), HookSet() as hs, head_ports(handle, on_port):
        hs.post(a.embed, embed_hook)
        for l in range(a.n_layers):
            hs.pre(a.ln_attn(l), lambda m, args, l=l: st["x"].__setitem__(l, args[0].detach()))
            hs.pre(a.ln_mlp(l), lambda m, args, l=l: st["mid"].__setitem__(l, args[0].detach()))
            hs.pre(a.mlp(l), lambda m, args, l=l: st["mlp_in"].__setitem__(l, args[0]))
        hs.pre(a.ln_final, lambda m, args: st.__setitem__("final", args[0]))
        logits = handle.last_logits(batch)
        m = per_prompt_scores(logits.float(), answers, distractors, gradient_metric(metric)).sum()
        keys = [("port", k) for k in st["port"]] + [("mlp_in", l) for l in st["mlp_in"]]
        tensors = [st[g][k] for g, k in keys] + [st["final"]]
        grads = torch.autograd.grad(m, tensors, allow_unused=True)
    g = {key: (gr if gr is not None else torch.zeros_like(t)) for key, gr, t in zip(keys, grads, tensors)}
    g_final = grads[-1] if grads[-1] is not None else torch.zeros_like(st["final"])

    Dflat = D.reshape(D.shape[0], -1)
    out = torch.zeros(graph.n_dests, graph.n_sources)
    with torch.no_grad():
        for l in range(a.n_layers):
            per_port = []
            for p in PORTS:
                W, _ = port_weight(a, l, p)
                per_port.append(torch.einsum("bthe,hde->hbtd", g[("port", (l, p))].float(), W.float()))
            gx = _norm_vjp(a.ln_attn(l), st["x"][l], torch.cat(per_port))
            n = graph.valid_sources(graph.port_dst(l, "q", 0))
            first = graph.port_dst(l, "q", 0)
            out[first:first + 3 * a.n_heads, :n] = gx.reshape(gx.shape[0], -1) @ Dflat[:n].T
            gm = _norm_vjp(a.ln_mlp(l), st["mid"][l], g[("mlp_in", l)].float().unsqueeze(0))
            v = graph.mlp_dst(l)
            n = graph.valid_sources(v)
            out[v, :n] = (Dflat[:n] @ gm.reshape(-1))
        out[graph.logits_dst] = Dflat @ g_final.float().reshape(-1)
    return out


def edge_attribution_scores(ev, method: str = "eap", steps: int = 5, progress=None) -> dict[str, float]:
    """Normalised edge scores (``{"a3.h1->a7.h2.q": score}``) from EAP or EAP-IG, using the reference
    activations of ``ev`` (an :class:`~knowedit.discovery.evaluate.Evaluator`)."""
    check_ig_reference(method, ev.reference)
    h, task = ev.handle, ev.task
    a = h.adapter
    graph = ev.graph
    total = torch.zeros(graph.n_dests, graph.n_sources, dtype=torch.float64)
    it = range(len(ev.batches))
    for k in (progress(it, desc=f"{method} (edges)") if progress else it):
        i, b, ans, dis = ev.batches[k]
        ref = ev.ref(k)
        with torch.no_grad():
            D = source_outputs(a, ref["z"], ref["mlp"], ref["emb"][0] if graph.emb else None) - \
                clean_sources(h, b, graph.emb)
        if method == "eap":
            total += gradient_terms(h, b, ans, dis, task.metric, D, graph).double()
        else:
            cb = h.tokenize(task.corrupt[i:i + len(b)], bos=task.bos)
            for e in interpolated_embeddings(h, b, cb, steps):
                total += gradient_terms(h, b, ans, dis, task.metric, D, graph, emb=e).double() / steps
        del D
    scores = -(total / len(task)) / ev.gap()
    return graph.scores_to_dict(scores.float())
