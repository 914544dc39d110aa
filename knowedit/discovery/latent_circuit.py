"""Circuits of SAE latents at one site: attribution patching on latents, faithfulness with latents
ablated, and the heads that write the chosen latents.

The SAE is spliced with its error term, so the model is exact until latents are ablated; the
candidates are every latent of the site's SAE. ``∅`` ablates all of them (the error term stays: it is
what the SAE does not explain, and no latent owns it) and faithfulness is, as for nodes,
``(m(C) - m(∅)) / (m(N) - m(∅))``. A latent outside the circuit takes its reference value:

* ``patch`` (default): its value on the prompt's own corrupted counterpart (pairs of equal token length);
* ``mean``: its mean over every real token of the corrupted prompts (but the first, which a spliced
  SAE leaves alone).

EAP on latents scores latent i by ``-Σ (a_ref - a)·∂m/∂a / (n · (m(N) - m(∅)))`` on the clean run, the
gradient reaching the latent through the decoder (``record_latents(grad=True)``), the same
normalisation and sign as node scores."""
from __future__ import annotations

import torch

from ..circuit import Circuit
from ..circuit.circuit import model_info
from ..errors import KnoweditError
from ..sae.latents import record_latents
from ..sae.registry import sae_at
from ..sae.site import Site, parse_site
from ..sae.splice import operations
from ..tasks.base import per_prompt_scores
from .evaluate import checked_gap, gradient_metric
from .select import greedy_prune, ranked, smallest_top_k

ABLATIONS = ("patch", "mean")


class LatentEvaluator:
    """The task metric with chosen latents of one site kept and the others ablated."""

    def __init__(self, handle, task, site: Site | str, ablation: str = "patch", batch_size: int = 32):
        if ablation not in ABLATIONS:
            raise KnoweditError(f"ablation: {ablation!r} is unknown for latents; use one of {ABLATIONS}")
        self.handle, self.task, self.batch_size, self.ablation = handle, task, batch_size, ablation
        self.site = site if isinstance(site, Site) else parse_site(site)
        self.sae = sae_at(handle, self.site)
        self.nodes = [f"{self.site}.f{i}" for i in range(self.sae.width)]
        self.batches = []
        for i in range(0, len(task), batch_size):
            b = handle.tokenize(task.clean[i:i + batch_size], bos=task.bos)
            self.batches.append((i, b, torch.tensor(task.answers[i:i + len(b)]),
                                 torch.tensor(task.distractors[i:i + len(b)])))
        self._refs = self._references()
        self._full = self._empty = None

    def settings(self) -> dict:
        detail = ("latents from each prompt's own corrupted counterpart" if self.ablation == "patch" else
                  "each latent's mean over every real token of the corrupted prompts")
        return {"ablation": self.ablation, "ablation_detail": detail, "error_term": "kept"}

    @torch.no_grad()
    def _references(self) -> list[torch.Tensor]:
        h, t = self.handle, self.task
        corrupt = [h.tokenize(t.corrupt[i:i + len(b)], bos=t.bos) for i, b, _, _ in self.batches]
        recs = []
        for (i, b, _, _), cb in zip(self.batches, corrupt):
            if self.ablation == "patch" and (cb.input_ids.shape != b.input_ids.shape
                                             or not bool((cb.lengths == b.lengths).all())):
                raise KnoweditError(f"task {t.name!r}: clean and corrupted prompts {i}..{i + len(b) - 1} differ in "
                                    "token length; ablation='patch' needs equal lengths (use ablation='mean')")
            with record_latents(h, sites=[self.site]) as rec:
                h.forward(cb)
            mask = cb.attention_mask.clone()
            if self.sae.skip_first:
                mask[:, 0] = 0   # the first position's latents are not read (SAE.skip_first)
            recs.append((rec.acts[self.site], mask))
        if self.ablation == "patch":
            return [a for a, _ in recs]
        total = sum((a * m.unsqueeze(-1)).sum((0, 1)) for a, m in recs)
        mean = total / sum(float(m.sum()) for _, m in recs)
        return [mean.expand_as(a) for a, _ in recs]

    @torch.no_grad()
    def _batch_sum(self, k: int, keep: torch.Tensor | None) -> float:
        _, b, a, d = self.batches[k]
        ref = self._refs[k]

        def op(acts):
            if keep is None:
                return None
            T = acts.shape[1]
            return torch.where(keep.to(acts.device), acts, ref[:, :T].to(acts.device))
        with operations(self.handle, {self.site: [op]}):
            logits = self.handle.last_logits(b)
        return float(per_prompt_scores(logits.float(), a, d, self.task.metric).double().sum())

    def _mask(self, names) -> torch.Tensor:
        keep = torch.zeros(self.sae.width, dtype=torch.bool)
        for n in names:
            c = self.handle.component(n)
            if not c.is_latent or Site("r" if c.kind == "resid_latent" else "m", c.layer) != self.site:
                raise KnoweditError(f"{n!r} is not a latent of the SAE at {self.site}")
            self.sae.check_index(c.index, c.name)
            keep[c.index] = True
        return keep

    def metric(self, keep_names=None) -> float:
        """The task metric with every latent outside ``keep_names`` ablated (None: nothing ablated)."""
        keep = None if keep_names is None else self._mask(keep_names)
        return sum(self._batch_sum(k, keep) for k in range(len(self.batches))) / len(self.task)

    @property
    def full(self) -> float:
        if self._full is None:
            self._full = self.metric(None)
        return self._full

    @property
    def empty(self) -> float:
        if self._empty is None:
            self._empty = self.metric([])
        return self._empty

    def gap(self) -> float:
        return checked_gap(self.task, self.full, self.empty, f"latent at {self.site}")

    def faithfulness(self, names) -> float:
        return (self.metric(list(names)) - self.empty) / self.gap()


def latent_scores(ev: LatentEvaluator) -> dict[str, float]:
    """EAP scores of every latent at the evaluator's site (one forward and backward per batch)."""
    h = ev.handle
    total = torch.zeros(ev.sae.width, dtype=torch.float64)
    for k, (_, b, a, d) in enumerate(ev.batches):
        with torch.enable_grad(), record_latents(h, sites=[ev.site], grad=True) as rec:
            logits = h.last_logits(b)
            m = per_prompt_scores(logits.float(), a, d, gradient_metric(ev.task.metric)).sum()
            acts = rec.acts[ev.site]
            (g,) = torch.autograd.grad(m, [acts])
        T = acts.shape[1]
        total += ((ev._refs[k][:, :T] - acts.detach()) * g).sum((0, 1)).double().cpu()
    gap = ev.gap()
    return {n: float(-(total[i] / len(ev.task)) / gap) for i, n in enumerate(ev.nodes)}


@torch.no_grad()
def latent_writers(handle, task, names, top: int = 5, batch_size: int = 32) -> dict[str, list[tuple[str, float]]]:
    """For each latent of a residual-stream SAE: the heads whose outputs push its pre-activation up
    most, ``head_out · W_enc[:, i]`` averaged over the clean prompts' positions where the latent is
    active (a direct effect; an SAE with run-time input normalisation divides it by the same per-token
    scale, ignored here)."""
    from ..hooks import record

    comps = [handle.component(n) for n in names]
    if not comps:
        return {}
    site = Site("r" if comps[0].kind == "resid_latent" else "m", comps[0].layer)
    if site.kind != "r" or any(c.layer != site.layer or c.kind != comps[0].kind for c in comps):
        raise KnoweditError("latent_writers: give latents of one residual-stream SAE (r{L}.f{i})")
    sae = sae_at(handle, site)
    a = handle.adapter
    idx = torch.tensor([c.index for c in comps])
    w = sae.W_enc[:, idx]                                       # [d, k]
    layers = range(site.layer + 1)
    sums = torch.zeros(len(layers), a.n_heads, len(idx), dtype=torch.float64)
    count = torch.zeros(len(idx), dtype=torch.float64)
    for i in range(0, len(task), batch_size):
        b = handle.tokenize(task.clean[i:i + batch_size], bos=task.bos)
        with record(handle, [f"a{l}.h0" for l in layers]) as rec, record_latents(handle, sites=[site]) as lrec:
            handle.forward(b)
        on = (lrec.acts[site][..., idx] > 0) & b.attention_mask.bool().unsqueeze(-1)   # [B, T, k]
        count += on.sum((0, 1)).double()
        for l in layers:
            for hd in range(a.n_heads):
                proj = rec.head_out(l, hd).float() @ w.to(rec.z[l].device)          # [B, T, k]
                sums[l, hd] += (proj * on).sum((0, 1)).double().cpu()
    mean = sums / count.clamp(min=1)
    out = {}
    for j, c in enumerate(comps):
        flat = [(f"a{l}.h{hd}", float(mean[l, hd, j])) for l in layers for hd in range(a.n_heads)]
        out[c.name] = sorted(flat, key=lambda t: -t[1])[:top]
    return out


def discover_latents(handle, task, site: Site | str, target: float = 0.7, max_latents: int = 50,
                     ablation: str = "patch", ranking: str = "signed", prune: bool = True, batch_size: int = 32,
                     writers: int = 5, progress=None) -> Circuit:
    """A latent-level circuit at ``site``: EAP scores, the smallest top-k (at most ``max_latents``)
    reaching ``target`` faithfulness, greedy pruning, and each kept latent's writing heads."""
    ev = LatentEvaluator(handle, task, site, ablation=ablation, batch_size=batch_size)
    scores = latent_scores(ev)
    order = ranked(scores, ranking)[:max_latents]
    k, f = smallest_top_k(ev, order, target, progress)
    members = order[:k]
    if prune and members:
        members, f = greedy_prune(ev, members, scores, target, progress)
    sae = ev.sae
    card = sae.source.get("card") or {}
    method = {"name": "eap", "level": "latent", "site": str(ev.site), "ranking": ranking, "target": target,
              "max_latents": max_latents, "pruned": prune, **ev.settings(),
              "sae": {"hookpoint": sae.hookpoint, "width": sae.width, "kind": sae.kind, "activation": sae.activation,
                      "k": sae.k, "format": sae.source.get("format"), "path": sae.source.get("path"),
                      "card_fingerprint": card.get("fingerprint")}}
    extra = {"metric_full": ev.full, "metric_empty": ev.empty, "n_latents": len(members),
             "all_scores": {n: scores[n] for n in ranked(scores, "abs")[:500]},
             "writers": latent_writers(handle, task, members, top=writers, batch_size=batch_size)
             if members and ev.site.kind == "r" else {}}
    task_info = {"name": task.name, "n": len(task), "metric": task.metric, "bos": handle.uses_bos(task.bos)}
    return Circuit(model_info(handle), task_info, method, {n: scores[n] for n in members}, {}, faithfulness=f,
                   extra=extra)
