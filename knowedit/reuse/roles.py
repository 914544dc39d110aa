"""Each head's role in a task, from its attention at the answer position, its direct logit
attribution (DLA), and its attention patterns over repeated tokens.

Roles follow Wang et al. (2022) / Merullo et al. (2024):

- ``mover``: attends from the final position to the answer/distractor tokens and copies the token it
  attends to most (DLA >= DLA_MIN towards it);
- ``negative mover``: attends there and writes *against* the token it attends to most (a head that
  attends to the distractor and raises answer-minus-distractor suppresses the distractor);
- ``inhibition``: attends to the distractors (>= ATTN_MIN) with little direct effect (|DLA| <
  DLA_MIN): in IOI these are the S-inhibition heads, which act through later heads' queries;
- ``induction`` / ``duplicate-token`` / ``previous-token``: measured over every repeated token of
  the prompt (attention to the token after / at the earlier occurrence) and every position (t-1).
"""
from __future__ import annotations

import pandas as pd
import torch

from ..errors import KnoweditError
from ..hooks import record, record_attention

# Mean attention from the final position to a token class for a head to count as attending to it.
ATTN_MIN = 0.15
# |DLA| in logit-difference units (answer minus distractor logit) for a direct effect.
DLA_MIN = 0.25
# Mean attention on repeated tokens (to the earlier copy, or to the token after it) and to t-1.
DUPLICATE_MIN = 0.3
INDUCTION_MIN = 0.3
PREVIOUS_MIN = 0.5

ROLES = ("mover", "negative mover", "inhibition", "induction", "duplicate-token", "previous-token", "other")


def classify(attn_answer: float, attn_distractor: float, dla: float, duplicate: float, induction: float,
             previous: float) -> str:
    """The role from a head's measurements (thresholds are the module constants)."""
    if attn_answer + attn_distractor >= ATTN_MIN:
        # Signed towards the token the head attends to most: + copies it, - suppresses it.
        toward = dla if attn_answer >= attn_distractor else -dla
        if toward >= DLA_MIN:
            return "mover"
        if toward <= -DLA_MIN:
            return "negative mover"
        if attn_distractor >= ATTN_MIN and abs(dla) < DLA_MIN:
            return "inhibition"
    if induction >= INDUCTION_MIN:
        return "induction"
    if duplicate >= DUPLICATE_MIN:
        return "duplicate-token"
    if previous >= PREVIOUS_MIN:
        return "previous-token"
    return "other"


def _final_norm_scale(handle, resid: torch.Tensor):
    """How the final norm maps a residual direction at the last position: centre (LayerNorm), divide
    by the stream's own scale, multiply by the weight. Linearised at the actual stream (frozen scale)."""
    ln = handle.adapter.ln_final
    centred = getattr(ln, "bias", None) is not None
    x = resid - resid.mean(-1, keepdim=True) if centred else resid
    eps = getattr(ln, "eps", getattr(ln, "variance_epsilon", 1e-5))
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    return centred, scale, handle.adapter.value(ln).detach()


def _repeat_stats(pattern: torch.Tensor, ids: torch.Tensor, length: int):
    """Mean attention to the earlier copy, to the token after it, and to t-1 (one prompt, ``[H, T, T]``)."""
    ids = ids[:length].tolist()
    first, dup, ind = {}, [], []
    for q, t in enumerate(ids):
        if t in first and first[t] + 1 < q:
            s = first[t]
            dup.append(pattern[:, q, s])
            ind.append(pattern[:, q, s + 1])
        first.setdefault(t, q)
    H = pattern.shape[0]
    z = torch.zeros(H)
    d = torch.stack(dup).mean(0) if dup else z
    i = torch.stack(ind).mean(0) if ind else z
    q = torch.arange(1, length)
    prev = pattern[:, q, q - 1].mean(-1) if length > 1 else z
    return d, i, prev


@torch.no_grad()
def head_profiles(handle, task, heads=None, batch_size: int = 16) -> pd.DataFrame:
    """One row per head: ``attn_answer``, ``attn_distractor`` (at the final position), ``dla``,
    ``duplicate``, ``induction``, ``previous`` and ``role``. Needs the task's distractor and answer
    positions."""
    if not task.distractor_positions:
        raise KnoweditError(f"task {task.name!r} has no distractor_positions; roles need the distractor tokens' "
                            f"positions (build the task with a generator that records them)")
    answer_pos = (task.positions or {}).get("answer") or [[] for _ in range(len(task))]
    comps = handle.components(heads) if heads is not None else handle.all_heads()
    a = handle.adapter
    layers = sorted({c.layer for c in comps})
    W_U = a.value(a.unembed).detach()
    sums = {k: torch.zeros(a.n_layers, a.n_heads) for k in ("ans", "dis", "dla", "dup", "ind", "prev")}
    for i in range(0, len(task), batch_size):
        batch = handle.tokenize(task.clean[i:i + batch_size])
        with record_attention(handle, layers) as att, record(handle, comps, resid=True) as rec:
            handle.last_logits(batch)
        B = len(batch)
        rows = torch.arange(B)
        last = batch.last.cpu()
        direction = (W_U[task.answers[i:i + B]] - W_U[task.distractors[i:i + B]]).float()  # [B, d]
        centred, scale, w = _final_norm_scale(handle, rec.resid[a.n_layers][rows, last].float())
        for l in layers:
            p = att[l].float().cpu()  # [B, H, T, T]
            at_last = p[rows, :, last]  # [B, H, T]
            for b in range(B):
                sums["ans"][l] += at_last[b][:, answer_pos[i + b]].sum(-1)
                sums["dis"][l] += at_last[b][:, task.distractor_positions[i + b]].sum(-1)
                d, ind, prev = _repeat_stats(p[b], batch.input_ids[b].cpu(), int(batch.lengths[b]))
                sums["dup"][l] += d
                sums["ind"][l] += ind
                sums["prev"][l] += prev
            for c in (c for c in comps if c.layer == l):
                out = rec.head_out(l, c.head)[rows, last].float()  # [B, d]
                if centred:
                    out = out - out.mean(-1, keepdim=True)
                sums["dla"][l, c.head] += ((out * scale * w) * direction).sum(-1).sum().cpu()
    n = len(task)
    out = []
    for c in comps:
        m = {k: float(v[c.layer, c.head]) / n for k, v in sums.items()}
        out.append({"component": c.name, "layer": c.layer, "head": c.head, "attn_answer": m["ans"],
                    "attn_distractor": m["dis"], "dla": m["dla"], "duplicate": m["dup"], "induction": m["ind"],
                    "previous": m["prev"],
                    "role": classify(m["ans"], m["dis"], m["dla"], m["dup"], m["ind"], m["prev"])})
    df = pd.DataFrame(out)
    df.attrs.update({"task": task.name, "n_prompts": n, "thresholds": {
        "ATTN_MIN": ATTN_MIN, "DLA_MIN": DLA_MIN, "DUPLICATE_MIN": DUPLICATE_MIN, "INDUCTION_MIN": INDUCTION_MIN,
        "PREVIOUS_MIN": PREVIOUS_MIN}})
    return df
