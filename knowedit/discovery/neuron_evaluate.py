"""The task metric with chosen MLP neurons ablated, and neuron-level faithfulness.

Candidates are the MLP neurons of every layer; heads are always kept (a neuron circuit answers
"which neurons", with attention as it is). The empty circuit has every neuron replaced by its
reference value (position-wise means over the corrupted prompts of the same template, or each
prompt's corrupted counterpart), so ``f = (m(C) - m(∅)) / (m(N) - m(∅))`` as for nodes."""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import KnoweditError
from ..hooks import keep_neurons
from ..tasks.base import per_prompt_scores
from .evaluate import Evaluator, checked_gap
from .reference import Reference


class NeuronEvaluator(Evaluator):
    """``metric(keep)`` with ``keep = {layer: bool [d_mlp]}`` (layers left out keep every neuron)."""

    def __init__(self, handle, task, ablation: str = "mean", batch_size: int = 32, means: str = "template"):
        ref = Reference(handle, task, ablation, batch_size, means=means, neurons=True)
        super().__init__(handle, task, ablation=ablation, batch_size=batch_size, reference=ref, candidates="heads")
        a = handle.adapter
        self.n_layers, self.d_mlp = a.n_layers, a.d_mlp
        self.nodes = []          # no head or MLP is a candidate here
        self.fixed = [c.name for c in handle.all_heads()]

    @property
    def n_candidates(self) -> int:
        return self.n_layers * self.d_mlp

    def masks(self, selection) -> dict[int, torch.Tensor]:
        """``{layer: bool [d_mlp]}`` kept masks from ``{layer: indices}``, a flat index list
        (``layer * d_mlp + i``) or masks already; every layer present (absent layers keep nothing)."""
        out = {l: torch.zeros(self.d_mlp, dtype=torch.bool) for l in range(self.n_layers)}
        if isinstance(selection, torch.Tensor) and selection.dtype == torch.bool:
            return {l: selection[l].clone() for l in range(self.n_layers)}
        if isinstance(selection, Mapping):
            for l, idx in selection.items():
                if not 0 <= int(l) < self.n_layers:
                    raise KnoweditError(f"neurons: layer {l} is out of range 0..{self.n_layers - 1}")
                if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
                    out[int(l)] = idx.clone()
                else:
                    out[int(l)][torch.as_tensor(list(idx), dtype=torch.long)] = True
            return out
        flat = torch.as_tensor(list(selection), dtype=torch.long)
        m = torch.zeros(self.n_layers * self.d_mlp, dtype=torch.bool)
        m[flat] = True
        m = m.view(self.n_layers, self.d_mlp)
        return {l: m[l] for l in range(self.n_layers)}

    @torch.no_grad()
    def batch_sum(self, k: int, keep: dict[int, torch.Tensor] | None) -> float:
        _, b, a, d = self.batches[k]
        if keep is None:
            logits = self.handle.last_logits(b)
        else:
            with keep_neurons(self.handle, keep, self.ref(k)["neuron"]):
                logits = self.handle.last_logits(b)
        return float(per_prompt_scores(logits.float(), a, d, self.task.metric).double().sum())

    def metric(self, keep) -> float:
        return sum(self.batch_sum(k, keep) for k in range(len(self.batches))) / len(self.task)

    @property
    def full(self) -> float:
        if self._full is None:
            self._full = self.metric(None)
        return self._full

    @property
    def empty(self) -> float:
        if self._empty is None:
            self._empty = self.metric(self.masks({}))
        return self._empty

    def gap(self) -> float:
        return checked_gap(self.task, self.full, self.empty, "MLP neuron")

    def faithfulness(self, selection) -> float:
        return (self.metric(self.masks(selection)) - self.empty) / self.gap()
