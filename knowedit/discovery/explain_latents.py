"""SAE latents in ``explain``: for every SAE attached to the model (:func:`knowedit.sae.attach`), the
latents that matter most for ``logit(A) - logit(B)`` at this prompt, listed beside the heads and MLPs.

Per latent, in the same units as the head and MLP rows:
* ``dla``: its activation at the last position times its decoder row, through the final norm (scale
  frozen) and ``U_A - U_B``: the direct path only. Latents re-describe the residual stream the heads and
  MLPs below their site wrote, so their ``dla`` is not part of ``dla_total``;
* ``attribution``: ``Σ_t (a_ref - a)·∂(logit A - logit B)/∂a``, the SAE spliced with its error term
  (``a_ref``: the corrupted prompt's latents when given, else zero);
* ``description``: one line from its top-activating contexts over ``corpus`` (cached; only when a
  corpus is given) and the tokens its decoder row promotes and suppresses (:mod:`knowedit.sae.describe`);
  ``contexts``: those contexts, the firing token marked ⟦ ⟧."""
from __future__ import annotations

import pandas as pd
import torch

from ..errors import KnoweditError
from ..sae.describe import context_strings, describe, logit_effects, top_contexts
from ..sae.latents import record_latents
from ..sae.registry import attached


def latent_rows(handle, out: pd.DataFrame, batch, ans: int, dis: int, direction: torch.Tensor, centre: bool,
                corrupt: str | None, bos, top: int, corpus=None) -> pd.DataFrame:
    """``out`` with the top latents of every attached SAE appended (``kind`` column: 'latent')."""
    saes = attached(handle)
    if not saes:
        return out
    last = int(batch.last[0])
    sites = sorted(saes)
    with torch.enable_grad(), record_latents(handle, sites=sites, grad=True) as rec:
        logits = handle.last_logits(batch)
        m = (logits[0, ans] - logits[0, dis]).float()
        grads = torch.autograd.grad(m, [rec.acts[s] for s in sites])
    ref = {}
    if corrupt is not None:
        cb = handle.tokenize([corrupt], bos=bos)
        if cb.input_ids.shape != batch.input_ids.shape:
            raise KnoweditError("corrupt: the corrupted prompt must have as many tokens as the prompt")
        with torch.no_grad(), record_latents(handle, sites=sites) as crec:
            handle.forward(cb)
        ref = crec.acts
    rows = []
    for s, g in zip(sites, grads):
        sae, acts = saes[s], rec.acts[s].detach()
        r = ref.get(s, torch.zeros_like(acts))
        attribution = ((r - acts) * g).sum((0, 1)).float().cpu()
        w = sae.W_dec.float()
        w = w - w.mean(-1, keepdim=True) if centre else w
        dla = acts[0, last].float().cpu() * (w @ direction.float().cpu())
        pick = set(attribution.abs().topk(min(top, sae.width)).indices.tolist())
        pick |= set(dla.abs().topk(min(top, sae.width)).indices.tolist())
        table = top_contexts(handle, sae, corpus) if corpus else None
        for i in sorted(pick):
            up, down = logit_effects(handle, sae, i, top=3)
            rows.append({"component": f"{s}.f{i}", "dla": float(dla[i]), "attribution": float(attribution[i]),
                         "kind": "latent", "activation": float(acts[0, last, i]),
                         "description": describe(handle, sae, i, table),
                         "promotes": [t for t, _ in up], "suppresses": [t for t, _ in down],
                         "contexts": [c for _, c in context_strings(handle, table, i)] if table is not None else []})
    lat = pd.DataFrame(rows)
    lat = lat.sort_values("attribution", key=abs, ascending=False, kind="stable").head(top * len(sites))
    lat["dla_rank"] = lat.dla.abs().rank(ascending=False, method="first").astype(int)
    base = out.copy()
    if "kind" not in base:
        base["kind"] = ["component"] * len(base)
    res = pd.concat([base, lat], ignore_index=True)
    res.attrs.update(out.attrs)
    res.attrs["latents"] = {str(s): {"hookpoint": saes[s].hookpoint, "width": saes[s].width} for s in sites}
    return res
