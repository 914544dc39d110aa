"""How good an SAE is on held-out text, with the protocol each number follows.

* ``fve``: fraction of variance explained, 1 - Σ‖x - x̂‖² / Σ‖x - x̄‖², over every real token but each
  sequence's first (x̄ the mean over those tokens; for a transcoder x is the MLP's output and x̂ its
  prediction from the input). The first position holds the attention sink, whose residual norm is ~70x
  the others' on SmolLM2-135M: counted in, it alone decides the FVE (with it an SAE that explains 17%
  of the other tokens' variance scores 0.84), so it is left out when ``sae.skip_first``, as the splice
  leaves it alone.
* ``l0``: mean number of nonzero latents per token.
* ``dead_share``: share of latents that are zero on every token of this text (so it depends on how much
  text there is: ``n_tokens`` says).
* ``ce_clean`` / ``ce_spliced`` / ``ce_increase``: mean next-token cross-entropy (nats) over every real
  position that has a next token, with the model as it is and with the site replaced by the SAE's
  reconstruction (spliced without the error term, the first position kept when ``sae.skip_first``);
  ``ce_increase`` = spliced - clean.
"""
from __future__ import annotations

import torch

from ..errors import KnoweditError
from ..hooks.hookset import HookSet
from ..models.handle import Batch
from .sae import SAE
from .splice import splice


def _ce(logits: torch.Tensor, batch: Batch) -> tuple[float, int]:
    lp = logits[:, :-1].float().log_softmax(-1)
    tgt = batch.input_ids[:, 1:]
    m = batch.attention_mask[:, 1:].bool()
    nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return float(nll[m].sum()), int(m.sum())


@torch.no_grad()
def evaluate(handle, sae: SAE, ids: list[list[int]], batch_size: int = 4) -> dict:
    """Metrics of ``sae`` (spliced at its site) on token-id sequences ``ids`` (see the module docstring)."""
    if not ids or not any(ids):
        raise KnoweditError("evaluate: no held-out text; give at least one non-empty token sequence")
    from .load import check_against
    check_against(sae, handle)
    a = handle.adapter
    module = a.block(sae.site.layer) if sae.site.kind == "r" else a.mlp(sae.site.layer)
    pad = handle.tokenizer.pad_token_id
    s_err = s_xx = 0.0
    sum_x = torch.zeros(sae.d_out, dtype=torch.float64)
    n_tok = 0
    l0_sum = 0.0
    fired = torch.zeros(sae.width, dtype=torch.bool)
    ce = {"clean": [0.0, 0], "spliced": [0.0, 0]}
    cur = {}

    def grab(mod, args, kwargs, out):
        x = (out[0] if isinstance(out, tuple) else out).float()
        x_in = (args[0] if args else next(iter(kwargs.values()))).float() if sae.kind == "transcoder" else x
        m = cur["mask"]
        acts = sae.encode(x_in[m])
        rec = sae.decode(acts, x_in[m])
        xt = x[m]
        cur["err"] = float((xt - rec).double().pow(2).sum())
        cur["xx"] = float(xt.double().pow(2).sum())
        cur["sum"] = xt.double().sum(0).cpu()
        cur["l0"] = float((acts != 0).sum())
        cur["fired"] = (acts != 0).any(0).cpu()

    rows = [r for r in ids if r]
    for i in range(0, len(rows), batch_size):
        batch = Batch.from_ids(rows[i:i + batch_size], pad, handle.device)
        cur["mask"] = batch.attention_mask.bool()
        if sae.skip_first:
            cur["mask"][:, 0] = False
        with HookSet() as hs:
            hs._handles.append(module.register_forward_hook(grab, with_kwargs=True))
            logits = handle.forward(batch)
        s, n = _ce(logits, batch)
        ce["clean"][0] += s
        ce["clean"][1] += n
        with splice(handle, sae, error_term=False):
            s, n = _ce(handle.forward(batch), batch)
        ce["spliced"][0] += s
        ce["spliced"][1] += n
        s_err += cur["err"]
        s_xx += cur["xx"]
        sum_x += cur["sum"]
        l0_sum += cur["l0"]
        fired |= cur["fired"]
        n_tok += int(cur["mask"].sum())
    total_var = s_xx - float(sum_x.pow(2).sum()) / n_tok
    ce_clean = ce["clean"][0] / max(ce["clean"][1], 1)
    ce_spliced = ce["spliced"][0] / max(ce["spliced"][1], 1)
    return {"fve": 1 - s_err / total_var, "first_position": "excluded" if sae.skip_first else "included", "l0": l0_sum / n_tok, "dead_share": float((~fired).float().mean()),
            "ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_increase": ce_spliced - ce_clean,
            "n_tokens": n_tok, "n_sequences": len(rows)}
