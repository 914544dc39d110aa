"""What a node is replaced with when it is outside the circuit (or when it is patched).

Two modes, recorded in every circuit's method settings:

* ``mean`` (default for EAP and exact patching): the node's activation averaged over the task's
  corrupted prompts *of the same template*, position by position (the IOI paper's mean ablation; a
  clean prompt gets the means of its own template, e.g. IOI's "When {A} and {B} went to the {P}, ..."
  over the ABC prompts of that template). Where a template's corrupted prompts differ in token length
  (sequences, facts, Colored Objects), position ``t`` averages those prompts that reach ``t``;
  positions beyond the template's longest corrupted prompt get the template's mean over every
  token. A task without template names is one template. Circuit files written before this rule
  (``means`` absent from their settings) are re-evaluated with the rule they were found with:
  prompts grouped by token length (``means='length'``).
* ``patch``: the node's activation on the clean prompt's own corrupted counterpart (each pair must
  have the same token length); the default for EAP-IG, which integrates along that same path.

Activations are head outputs before W_O (``z``, ``[B, T, n_heads, d_head]`` per layer), MLP
outputs (``[B, T, d_model]`` per layer), the embedding stream entering the first block
(``emb``, token and position embeddings) and, with ``neurons=True``, the MLP neurons (``neuron``,
``[B, T, d_mlp]`` per layer): the same places :mod:`knowedit.hooks` reads and writes."""
from __future__ import annotations

import torch

from ..errors import KnoweditError
from ..hooks import record

MODES = ("mean", "patch")
MEANS = ("template", "length")


def _layered(rec, n_layers):
    out = {"z": {l: rec.z[l] for l in range(n_layers)}, "mlp": {l: rec.mlp[l] for l in range(n_layers)},
           "emb": {0: rec.resid[0]}}
    if rec.neurons:
        out["neuron"] = {l: rec.neurons[l] for l in range(n_layers)}
    return out


def _recorded(handle, neurons: bool):
    """What a reference records: every head and MLP, and every MLP's neurons when asked."""
    comps = handle.all_heads() + handle.all_mlps()
    return comps + [f"m{l}.n0" for l in range(handle.adapter.n_layers)] if neurons else comps


class Reference:
    """Reference activations for a task's clean prompts, handed out batch by batch."""

    def __init__(self, handle, task, mode: str = "mean", batch_size: int = 32, means: str = "template",
                 neurons: bool = False):
        if mode not in MODES:
            raise KnoweditError(f"ablation: {mode!r} is unknown; use one of {MODES}")
        if means not in MEANS:
            raise KnoweditError(f"means: {means!r} is unknown; use one of {MEANS}")
        self.handle, self.task, self.mode, self.batch_size, self.means = handle, task, mode, batch_size, means
        self.neurons = neurons
        self.n_layers = handle.adapter.n_layers
        if mode == "mean":
            self._means()
        else:
            self._check_pairs()

    def settings(self) -> dict:
        if self.mode == "patch":
            return {"ablation": "patch", "ablation_detail": "activations from each prompt's own corrupted counterpart"}
        if self.means == "length":
            return {"ablation": "mean", "means": "length", "ablation_detail": "per-position mean over the "
                    "corrupted prompts of the same token length (token mean where no corrupted prompt has that length)"}
        return {"ablation": "mean", "means": "template", "ablation_detail": "per-position mean over the corrupted "
                "prompts of the prompt's template (position t over those that reach t; the template's token mean "
                "beyond its longest prompt)"}

    def _check_pairs(self):
        tok = self.handle.tokenizer
        for i, (c, k) in enumerate(zip(self.task.clean, self.task.corrupt)):
            lc = len(tok(c, add_special_tokens=False)["input_ids"])
            lk = len(tok(k, add_special_tokens=False)["input_ids"])
            if lc != lk:
                raise KnoweditError(f"task {self.task.name!r} item {i}: clean and corrupt prompts have {lc} and {lk} "
                                    "tokens; ablation='patch' needs equal lengths (use ablation='mean')")

    def _group(self, i: int, length: int):
        if self.means == "length":
            return length
        return self.task.templates[i] if self.task.templates is not None else ""

    @torch.no_grad()
    def _means(self):
        """Per group: position-wise sums and counts, and token sums (for positions past the group's end)."""
        h = self.handle
        pos: dict = {}      # group -> [sums {key: {layer: [T, ...]}}, counts [T]]
        tok: dict = {}      # group -> [sums {key: {layer: [...]}}, count]
        texts = self.task.corrupt
        for i in range(0, len(texts), self.batch_size):
            batch = h.tokenize(texts[i:i + self.batch_size], bos=self.task.bos)
            with record(h, _recorded(h, self.neurons), resid=True) as rec:
                h.forward(batch)
            acts = _layered(rec, self.n_layers)
            for b, L in enumerate(batch.lengths.tolist()):
                one = {k: {l: v[b, :L].float() for l, v in d.items()} for k, d in acts.items()}
                g = self._group(i + b, L)
                pos[g] = [one, torch.ones(L)] if g not in pos else _add_ragged(pos[g], one, torch.ones(L))
                t = {k: {l: v.sum(0) for l, v in d.items()} for k, d in one.items()}
                for key in (g, "*"):
                    tok[key] = [t, L] if key not in tok else [_add(tok[key][0], t), tok[key][1] + L]
        self.by_group = {g: {k: {l: v / c.view(-1, *[1] * (v.dim() - 1)) for l, v in d.items()} for k, d in s.items()}
                         for g, (s, c) in pos.items()}
        self.token_mean = {g: _scale(s, 1.0 / n) for g, (s, n) in tok.items()}

    def for_batch(self, start: int, batch) -> dict:
        """``{"z": {layer: [B,T,H,dh]}, "mlp": {layer: [B,T,d]}, "emb": {0: [B,T,d]}}`` for the clean
        prompts ``start : start + len(batch)``."""
        B, T = batch.input_ids.shape
        if self.mode == "patch":
            h = self.handle
            cb = h.tokenize(self.task.corrupt[start:start + B], bos=self.task.bos)
            with torch.no_grad(), record(h, _recorded(h, self.neurons), resid=True) as rec:
                h.forward(cb)
            out = _layered(rec, self.n_layers)
            return {k: {l: _pad(v, T) for l, v in d.items()} for k, d in out.items()}
        out = {k: {} for k in self.token_mean["*"]}
        lengths = batch.lengths.tolist()
        for k, layers in self.token_mean["*"].items():
            for l, glob in layers.items():
                v = glob.expand(B, T, *glob.shape).clone()
                for b, L in enumerate(lengths):
                    g = self._group(start + b, L)
                    if g not in self.by_group:
                        continue  # 'length' means: no corrupted prompt this long, the global token mean
                    pm = self.by_group[g][k][l][:T]
                    if self.means == "template":
                        v[b] = self.token_mean[g][k][l]
                    v[b, :len(pm)] = pm
                out[k][l] = v
        return out


def _add(a, b):
    return {k: {l: a[k][l] + b[k][l] for l in a[k]} for k in a}


def _add_ragged(acc, part, count):
    """Add one prompt's position-wise activations to a group's sums, extending them when it is longer."""
    sums, counts = acc
    T = max(len(counts), len(count))
    grow = lambda v: torch.cat([v, v.new_zeros(T - v.shape[0], *v.shape[1:])]) if v.shape[0] < T else v
    new = {k: {l: grow(sums[k][l]) + grow(part[k][l]) for l in sums[k]} for k in sums}
    return [new, grow(counts) + grow(count)]


def _scale(a, s):
    return {k: {l: v * s for l, v in d.items()} for k, d in a.items()}


def _pad(v, T):
    if v.shape[1] >= T:
        return v[:, :T]
    pad = torch.zeros(v.shape[0], T - v.shape[1], *v.shape[2:], dtype=v.dtype)
    return torch.cat([v, pad], 1)
