"""What one mask logit stands for at each granularity, and how unit masks become weight masks.

* ``weight``: one logit per maskable element (:mod:`knowedit.circuit.maskable`). Under ``mean``
  ablation biases are not candidates (a mean-ablated bias is the bias) and stay in the mask.
* ``neuron``: one logit per MLP hidden unit, applied to its down-projection column (which removes
  the unit exactly); the stored mask drops the unit's gate/up rows and down column. Attention and
  norms are not candidates and stay.
* ``head``: one logit per query head, applied to its W_O columns; the stored mask drops the head's
  q rows and W_O columns, and a KV head's k/v rows only when every query head reading it is dropped.
  MLPs and norms stay (Wang et al.'s head-only candidates).

``density`` is the share of candidate units kept: elements for ``weight`` (so it is the density by
parameter count), hidden units or heads otherwise."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..circuit.maskable import maskable_params
from ..circuit.weight_mask import GRANULARITIES, WeightMask
from ..errors import KnoweditError


@dataclass
class Site:
    param: str                               # the parameter the logits scale
    n_units: int
    expand: Callable[[torch.Tensor], torch.Tensor]  # unit values -> a tensor broadcastable to the parameter


def _along_in_dim(handle, mod, repeat: int = 1):
    a = handle.adapter
    in_dim = a.in_dim(mod)

    def expand(v):
        v = v.repeat_interleave(repeat) if repeat > 1 else v
        return v.view(1, -1) if in_dim == 1 else v.view(-1, 1)
    return expand


def sites(handle, granularity: str, ablation: str) -> list[Site]:
    if granularity not in GRANULARITIES:
        raise KnoweditError(f"granularity: {granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
    a = handle.adapter
    if granularity == "weight":
        out = []
        for p in maskable_params(handle):
            if ablation == "mean" and p.name.endswith(".bias"):
                continue
            shape = p.shape
            out.append(Site(p.name, int(torch.Size(shape).numel()), lambda v, s=shape: v.view(s)))
        return out
    if granularity == "neuron":
        return [Site(a.name_of(a.mlp_out(l).weight), a.d_mlp, _along_in_dim(handle, a.mlp_out(l)))
                for l in range(a.n_layers)]
    return [Site(a.name_of(a.o_proj(l).weight), a.n_heads, _along_in_dim(handle, a.o_proj(l), a.d_head))
            for l in range(a.n_layers)]


def weight_mask_from_units(handle, granularity: str, ablation: str, keep: list[torch.Tensor]) -> WeightMask:
    """The stored element mask for per-site boolean unit vectors ``keep`` (see module doc)."""
    a = handle.adapter
    full = {p.name: torch.ones(p.shape, dtype=torch.bool) for p in maskable_params(handle)}
    if granularity == "weight":
        for s, k in zip(sites(handle, granularity, ablation), keep):
            full[s.param] = k.view(full[s.param].shape).cpu()
        return WeightMask(handle, full, "weight")

    def clear(slices):
        for sl in slices:
            idx = torch.tensor(sl.indices)
            full[sl.param].index_fill_(sl.dim, idx, False)

    for l, k in enumerate(keep):
        dropped = [int(i) for i in torch.nonzero(~k.cpu()).flatten()]
        if not dropped:
            continue
        if granularity == "neuron":
            clear(a.mlp_slices(l, dropped))
        else:
            for h in dropped:
                clear(a.head_slices(l, h, "qo"))
            group = a.n_heads // a.n_kv_heads
            for kv in range(a.n_kv_heads):
                if all(h in dropped for h in range(kv * group, (kv + 1) * group)):
                    clear(a.head_slices(l, kv * group, "kv"))
    return WeightMask(handle, full, granularity)
