"""What a node is replaced with when it is outside the circuit (or when it is patched).

Two modes, recorded in every circuit's method settings:

* ``mean`` (default): the node's mean activation over the task's corrupted prompts, per position,
  averaged over the corrupted prompts that have the same token length as the clean prompt (for
  templated tasks such as IOI that is the prompt's template family); a clean prompt whose length no
  corrupted prompt has gets the mean over every real token of the corrupted prompts.
* ``patch``: the node's activation on the clean prompt's own corrupted counterpart (each pair must
  have the same token length).

Activations are head outputs before W_O (``z``, ``[B, T, n_heads, d_head]`` per layer) and MLP
outputs (``[B, T, d_model]`` per layer): the same places :mod:`knowedit.hooks` reads and writes."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import KnoweditError
from ..hooks import record

MODES = ("mean", "patch")


def _layered(rec, n_layers):
    return {"z": {l: rec.z[l] for l in range(n_layers)}, "mlp": {l: rec.mlp[l] for l in range(n_layers)}}


class Reference:
    """Reference activations for a task's clean prompts, handed out batch by batch."""

    def __init__(self, handle, task, mode: str = "mean", batch_size: int = 32):
        if mode not in MODES:
            raise KnoweditError(f"ablation: {mode!r} is unknown; use one of {MODES}")
        self.handle, self.task, self.mode, self.batch_size = handle, task, mode, batch_size
        self.n_layers = handle.adapter.n_layers
        if mode == "mean":
            self._means()
        else:
            self._check_pairs()

    def settings(self) -> dict:
        if self.mode == "mean":
            return {"ablation": "mean", "ablation_detail": "per-position mean over the corrupted prompts of "
                    "the same token length (token mean where no corrupted prompt has that length)"}
        return {"ablation": "patch", "ablation_detail": "activations from each prompt's own corrupted counterpart"}

    def _check_pairs(self):
        tok = self.handle.tokenizer
        for i, (c, k) in enumerate(zip(self.task.clean, self.task.corrupt)):
            lc = len(tok(c, add_special_tokens=False)["input_ids"])
            lk = len(tok(k, add_special_tokens=False)["input_ids"])
            if lc != lk:
                raise KnoweditError(f"task {self.task.name!r} item {i}: clean and corrupt prompts have {lc} and {lk} "
                                    "tokens; ablation='patch' needs equal lengths (use ablation='mean')")

    @torch.no_grad()
    def _means(self):
        h = self.handle
        sums = defaultdict(lambda: None)  # length -> {"z": {l: [L,H,dh]}, "mlp": ...}
        counts: dict[int, int] = defaultdict(int)
        tok_sum, tok_n = None, 0
        texts = self.task.corrupt
        for i in range(0, len(texts), self.batch_size):
            batch = h.tokenize(texts[i:i + self.batch_size])
            with record(h) as rec:
                h.forward(batch)
            acts = _layered(rec, self.n_layers)
            w = batch.attention_mask.to(torch.float32)
            flat = {k: {l: (v * w.view(*w.shape, *[1] * (v.dim() - 2))).sum((0, 1)) for l, v in d.items()}
                    for k, d in acts.items()}
            tok_sum = flat if tok_sum is None else _add(tok_sum, flat)
            tok_n += int(w.sum())
            for b, L in enumerate(batch.lengths.tolist()):
                one = {k: {l: v[b, :L].float() for l, v in d.items()} for k, d in acts.items()}
                sums[L] = one if sums[L] is None else _add(sums[L], one)
                counts[L] += 1
        self.by_length = {L: _scale(s, 1.0 / counts[L]) for L, s in sums.items()}
        self.token_mean = _scale(tok_sum, 1.0 / tok_n)

    def for_batch(self, start: int, batch) -> dict:
        """``{"z": {layer: [B,T,H,dh]}, "mlp": {layer: [B,T,d]}}`` for the clean prompts
        ``start : start + len(batch)``."""
        B, T = batch.input_ids.shape
        if self.mode == "patch":
            h = self.handle
            cb = h.tokenize(self.task.corrupt[start:start + B])
            with torch.no_grad(), record(h) as rec:
                h.forward(cb)
            out = _layered(rec, self.n_layers)
            return {k: {l: _pad(v, T) for l, v in d.items()} for k, d in out.items()}
        out = {"z": {}, "mlp": {}}
        lengths = batch.lengths.tolist()
        for k in ("z", "mlp"):
            for l in range(self.n_layers):
                tm = self.token_mean[k][l]
                v = tm.expand(B, T, *tm.shape).clone()
                for b, L in enumerate(lengths):
                    if L in self.by_length:
                        v[b, :L] = self.by_length[L][k][l]
                out[k][l] = v
        return out


def _add(a, b):
    return {k: {l: a[k][l] + b[k][l] for l in a[k]} for k in a}


def _scale(a, s):
    return {k: {l: v * s for l, v in d.items()} for k, d in a.items()}


def _pad(v, T):
    if v.shape[1] >= T:
        return v[:, :T]
    pad = torch.zeros(v.shape[0], T - v.shape[1], *v.shape[2:], dtype=v.dtype)
    return torch.cat([v, pad], 1)
