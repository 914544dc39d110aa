"""Zero and mean ablation of heads, MLPs and MLP neurons."""
from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch

from ..errors import KnoweditError
from ..models.components import Component
from .record import record
from .replace import replace_activations


@torch.no_grad()
def mean_activations(handle, reference_prompts: Sequence[str], components: Iterable[str | Component],
                     batch_size: int = 32, per_position: bool = False,
                     bos: bool | None = None) -> dict[Component, torch.Tensor]:
    """Means over a reference prompt set, over every real (non-padding) token.

    With ``per_position=True`` (all reference prompts must have the same token length) the mean is
    taken per position, giving ``[T, d]``, the usual choice for templated tasks such as IOI's ABC set."""
    comps = handle.components(list(components))
    if len(reference_prompts) == 0:
        raise KnoweditError("reference_prompts: the list is empty; mean ablation needs prompts to average over")
    sums: dict[Component, torch.Tensor] = {}
    count = 0
    for i in range(0, len(reference_prompts), batch_size):
        batch = handle.tokenize(reference_prompts[i:i + batch_size], bos=bos)
        if per_position and not bool((batch.lengths == batch.lengths[0]).all()):
            raise KnoweditError("reference_prompts: per_position means need prompts of equal token length")
        w = batch.attention_mask.to(torch.float32).unsqueeze(-1)
        with record(handle, comps) as rec:
            handle.forward(batch)
        for c in comps:
            x = rec[c].to(torch.float32)
            x = x.unsqueeze(-1) if c.kind == "neuron" else x   # [B, T] -> [B, T, 1], like the others
            s = x.sum(0) if per_position else (x * w).sum((0, 1))
            if per_position and c in sums and sums[c].shape != s.shape:
                raise KnoweditError("reference_prompts: per_position means need prompts of equal token length")
            sums[c] = sums[c] + s if c in sums else s
        count += len(batch) if per_position else int(w.sum())
    return {c: (s / count).squeeze(-1) if c.kind == "neuron" else s / count for c, s in sums.items()}


@contextlib.contextmanager
def ablate(handle, components: Iterable[str | Component], how: str = "mean",
           reference: Sequence[str] | dict | None = None, positions=None):
    """Zero- or mean-ablate components while the block runs.

    ``reference`` is a prompt list to average over, or precomputed means from
    :func:`mean_activations` (reuse them: computing means costs forward passes)."""
    comps = handle.components(list(components))
    if how == "zero":
        a = handle.adapter
        values = {c: torch.zeros(()) if c.kind == "neuron" else torch.zeros(a.d_head if c.kind == "head" else a.d_model)
                  for c in comps}
    elif how == "mean":
        if reference is None:
            raise KnoweditError("reference: mean ablation needs reference prompts or precomputed means")
        means = reference if isinstance(reference, dict) else mean_activations(handle, reference, comps)
        missing = [c.name for c in comps if c not in means]
        if missing:
            raise KnoweditError(f"reference: no mean for {missing}; compute means for these components")
        values = {c: means[c] for c in comps}
    else:
        raise KnoweditError(f"how: {how!r} is not an ablation; use 'zero' or 'mean'")
    with replace_activations(handle, values, positions=positions):
        yield
