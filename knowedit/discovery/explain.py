"""``explain``: why does the model say A and not B here? (the view of OpenAI's Transformer Debugger)

Two columns per head and MLP, both in logit-difference units ``logit(A) - logit(B)``:
* ``dla``: direct logit attribution, the component's output at the last position projected through
  the final norm (its scale frozen at this prompt's value) and the unembedding difference ``U_A - U_B``.
  ``emb`` is the embedding stream entering the first block (GPT-2's position embeddings included) and
  ``bias`` the constant terms no component owns (attention output biases, the final norm's and the
  unembedding's biases), so the ``dla`` of every row adds up to the logit difference;
* ``attribution``: attribution patching, ``(a_ref - a) · ∂(logit A - logit B)/∂a`` summed over positions,
  with ``a_ref`` the activation on ``corrupt`` when given, else zero (zero-ablation estimate)."""
from __future__ import annotations

import pandas as pd
import torch

from ..hooks import record
from .attribution import gradient_pass


def _final_scale(handle, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Per-feature multiplier of the final norm at this residual ``x`` [d], and whether it centres."""
    ln = handle.adapter.ln_final
    w = handle.adapter.value(ln).detach().float()
    eps = getattr(ln, "variance_epsilon", None) or getattr(ln, "eps", 1e-5)
    x = x.float()
    if isinstance(ln, torch.nn.LayerNorm):
        return w / torch.sqrt(x.var(unbiased=False) + eps), True
    return w / torch.sqrt(x.pow(2).mean() + eps), False


def _bias_dla(handle, dla, u: torch.Tensor, ans: int, dis: int) -> float:
    """The logit difference's share from biases: attention output biases go through the final norm
    like any output; the final norm's bias and the unembedding's add after it."""
    a = handle.adapter
    total = sum(dla(a.value(a.o_proj(l), "bias")) for l in range(a.n_layers) if getattr(a.o_proj(l), "bias", None) is not None)
    ln_bias = a.value(a.ln_final, "bias")
    if ln_bias is not None:
        total += float(ln_bias.detach().float() @ (u[ans] - u[dis]))
    ub = a.value(a.unembed, "bias")
    if ub is not None:
        total += float(ub[ans] - ub[dis])
    return float(total)


def explain(handle, prompt: str, answer: str, distractor: str, corrupt: str | None = None,
            top: int = 10, bos: bool | None = None, corpus: list[list[int]] | None = None) -> pd.DataFrame:
    """Top components by |dla| and by |attribution| (the union of both top lists), one row each.

    With SAEs attached to the model (:mod:`knowedit.sae`) their top latents follow, ``kind`` 'latent',
    each with a one-line description (top-activating contexts over ``corpus``, token ids, when given);
    see :mod:`knowedit.discovery.explain_latents`.

    ``attrs['dla_total']`` sums the direct attributions of every component, the embeddings and the
    biases; it equals the logit difference (up to float rounding)."""
    a = handle.adapter
    ans = handle.token_id(answer, "answer")
    dis = handle.token_id(distractor, "distractor")
    batch = handle.tokenize([prompt], bos=bos)
    last = int(batch.last[0])
    with torch.no_grad(), record(handle, resid=True) as rec:
        logits = handle.last_logits(batch)
    scale, centre = _final_scale(handle, rec.resid[a.n_layers][0, last])
    u = handle.adapter.value(handle.adapter.unembed).detach().float()
    direction = (u[ans] - u[dis]) * scale

    def dla(v):
        v = v.detach().float()
        return float(((v - v.mean()) if centre else v) @ direction)

    rows = {"emb": {"dla": dla(rec.resid[0][0, last]), "attribution": float("nan")},
            "bias": {"dla": _bias_dla(handle, dla, u, ans, dis), "attribution": float("nan")}}
    for l in range(a.n_layers):
        for hd in range(a.n_heads):
            rows[f"a{l}.h{hd}"] = {"dla": dla(rec.head_out(l, hd)[0, last])}
        rows[f"m{l}"] = {"dla": dla(rec.mlp[l][0, last])}
    t_a, t_d = torch.tensor([ans]), torch.tensor([dis])
    acts, grads, _ = gradient_pass(handle, batch, t_a, t_d, "logit_diff")
    if corrupt is not None:
        with torch.no_grad(), record(handle) as crec:
            handle.forward(handle.tokenize([corrupt], bos=bos))
        ref = {("z", l): crec.z[l].reshape(1, -1, a.n_heads * a.d_head) for l in range(a.n_layers)}
        ref.update({("mlp", l): crec.mlp[l] for l in range(a.n_layers)})
    for key, act in acts.items():
        r = ref[key][:, :act.shape[1]] if corrupt is not None else torch.zeros_like(act)
        if r.shape != act.shape:
            from ..errors import KnoweditError
            raise KnoweditError("corrupt: the corrupted prompt must have as many tokens as the prompt")
        d = (r - act) * grads[key]
        kind, l = key
        if kind == "z":
            per = d.view(*d.shape[:2], a.n_heads, a.d_head).sum((0, 1, 3))
            for hd in range(a.n_heads):
                rows[f"a{l}.h{hd}"]["attribution"] = float(per[hd])
        else:
            rows[f"m{l}"]["attribution"] = float(d.sum())
    df = pd.DataFrame([{"component": n, **v} for n, v in rows.items()])
    keep = set(df.reindex(df.dla.abs().sort_values(ascending=False, kind="stable").index).head(top).component)
    keep |= set(df.reindex(df.attribution.abs().sort_values(ascending=False, kind="stable").index).head(top).component)
    out = df[df.component.isin(keep)].copy()
    out["dla_rank"] = out.dla.abs().rank(ascending=False, method="first").astype(int)
    out = out.sort_values("dla", key=abs, ascending=False, kind="stable").reset_index(drop=True)
    ld = float(logits[0, ans] - logits[0, dis])
    out.attrs.update({"logit_diff": ld, "answer": answer, "distractor": distractor,
                      "reference": "corrupt prompt" if corrupt is not None else "zero ablation", "bos": handle.uses_bos(bos),
                      "dla_total": float(df.dla.sum())})
    from ..sae.registry import attached
    if attached(handle):   # SAE latents beside the heads and MLPs
        from .explain_latents import latent_rows
        out = latent_rows(handle, out, batch, ans, dis, direction, centre, corrupt, bos, top, corpus)
    return out
