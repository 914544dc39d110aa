"""Record, ablate, patch, steer and clamp SAE latents (``r12.f45``, ``m7.f3``) with the same shapes of
call as :mod:`knowedit.hooks` uses for heads and neurons. Each is a context manager; the SAE attached at
the latent's site is spliced in with its error term for the block (or the splice already active is
used), so everything not intervened on is the model's own computation.

Values follow the neuron conventions: one latent's value is ``[B, T]`` (a run on a batch of the same
size), ``[T]`` (per position) or a scalar; ``positions`` restricts a write to some positions (an int,
a list, or a LongTensor ``[B]`` of one position per prompt)."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import torch

from ..errors import KnoweditError
from ..hooks.neurons import fit_units, position_mask
from ..models.components import Component
from .registry import latent_components, sae_at, site_of
from .site import Site
from .splice import operations

HOWS = ("set", "add", "scale")


class LatentRecording:
    """Latent activations of one forward pass: ``acts[site]`` is ``[B, T, width]``; ``rec['r12.f45']``
    is one latent, ``[B, T]``."""

    def __init__(self, handle):
        self.handle = handle
        self.acts: dict[Site, torch.Tensor] = {}

    def __getitem__(self, key: str | Component) -> torch.Tensor:
        c = self.handle.component(key)
        if not isinstance(c, Component) or not c.is_latent:
            raise KeyError(f"{key!r} is not a latent")
        s = site_of(c)
        if s not in self.acts:
            raise KeyError(f"{key!r}: no latents were recorded at {s}")
        return self.acts[s][..., c.index]

    def __contains__(self, key) -> bool:
        try:
            self[key]
            return True
        except (KeyError, KnoweditError):
            return False


def _by_site(handle, components) -> dict[Site, list[Component]]:
    out: dict[Site, list[Component]] = defaultdict(list)
    for c in latent_components(handle, list(components)):
        out[site_of(c)].append(c)
    return out


@contextlib.contextmanager
def record_latents(handle, components: Iterable[str | Component] = (), sites: Iterable[Site | str] | None = None,
                   grad: bool = False):
    """Record the latents at the sites of ``components`` (all latents of those sites' SAEs; or give
    ``sites`` such as ``['r12']``) while the block runs.

    ``grad=True`` makes each site's recorded latents a leaf that requires grad and that the forward pass
    really depends on (through the decoder, values unchanged), so after ``metric.backward()``
    ``rec.acts[site].grad`` is d metric / d latent: attribution patching on latents."""
    wanted = set(_by_site(handle, components))
    for s in sites or ():
        s = s if isinstance(s, Site) else Site.parse(s)
        sae_at(handle, s)
        wanted.add(s)
    if not wanted:
        raise KnoweditError("record_latents: name at least one latent (e.g. 'r12.f45') or site (sites=['r12'])")
    rec = LatentRecording(handle)

    def keeper(site):
        def op(acts):
            if grad:
                leaf = acts.detach().clone().requires_grad_(True)
                rec.acts[site] = leaf
                return leaf
            rec.acts[site] = acts.detach()
            return None
        return op

    with operations(handle, {s: [keeper(s)] for s in sorted(wanted)}):
        yield rec


def _grouped(values: Mapping[Component, object]) -> dict[Site, tuple[list[int], torch.Tensor]]:
    per_site: dict[Site, dict[int, torch.Tensor]] = defaultdict(dict)
    for c, v in values.items():
        per_site[site_of(c)][c.index] = torch.as_tensor(v, dtype=torch.float32)
    out = {}
    for s, vals in per_site.items():
        idx = sorted(vals)
        try:
            out[s] = (idx, torch.stack(torch.broadcast_tensors(*[vals[i] for i in idx]), -1))
        except RuntimeError:
            raise KnoweditError(f"values for the latents at {s} have shapes that do not broadcast together "
                                f"({sorted({tuple(v.shape) for v in vals.values()})}); give each [B, T], [T] or a "
                                "scalar") from None
    return out


def _writer(site: Site, idx: list[int], value, how: str, positions):
    index = torch.tensor(idx, dtype=torch.long)

    def op(acts):
        i = index.to(acts.device)
        cur = acts.index_select(-1, i)
        v = fit_units(value, cur, len(idx), f"the latents at {site}", unit="latents")
        new = v if how == "set" else cur + v if how == "add" else cur * v
        pm = position_mask(positions, acts.shape[0], acts.shape[1], acts.device)
        if pm is not None:
            new = torch.where(pm.unsqueeze(-1), new, cur)
        out = acts.clone()
        out[..., i] = new
        return out
    return op


@contextlib.contextmanager
def write_latents(handle, values: Mapping[str | Component, object], how: str = "set", positions=None):
    """Set (``how='set'``), shift (``'add'``) or scale (``'scale'``) latents while the block runs:
    ``{"r12.f45": 0.0}``. The primitive behind ablate, patch, steer and clamp."""
    if how not in HOWS:
        raise KnoweditError(f"how: {how!r} is unknown; use one of {HOWS}")
    comps = latent_components(handle, list(values))
    vals = {c: values[k] for c, k in zip(comps, values)}
    ops = {s: [_writer(s, idx, v, how, positions)] for s, (idx, v) in _grouped(vals).items()}
    with operations(handle, ops):
        yield


@torch.no_grad()
def latent_means(handle, reference_prompts: Sequence[str], components: Iterable[str | Component],
                 batch_size: int = 32, per_position: bool = False, bos: bool | None = None) -> dict[Component, torch.Tensor]:
    """Each latent's mean over the real tokens of a reference prompt set (a scalar each; the first
    position left out when the SAE skips it), or per position (``[T]``; prompts of equal token
    length), for mean ablation."""
    comps = latent_components(handle, list(components))
    if len(reference_prompts) == 0:
        raise KnoweditError("reference_prompts: the list is empty; mean ablation needs prompts to average over")
    sums: dict[Component, torch.Tensor] = {}
    counts: dict[Component, int] = {}
    for i in range(0, len(reference_prompts), batch_size):
        batch = handle.tokenize(reference_prompts[i:i + batch_size], bos=bos)
        if per_position and not bool((batch.lengths == batch.lengths[0]).all()):
            raise KnoweditError("reference_prompts: per_position means need prompts of equal token length")
        w = batch.attention_mask.to(torch.float32)
        with record_latents(handle, comps) as rec:
            handle.forward(batch)
        for c in comps:
            x = rec[c].float()
            wc = w.clone()
            if sae_at(handle, site_of(c)).skip_first:
                wc[:, 0] = 0   # no latents are read at the first position (the attention sink)
            s = x.sum(0) if per_position else (x * wc).sum()
            if per_position and c in sums and sums[c].shape != s.shape:
                raise KnoweditError("reference_prompts: per_position means need prompts of equal token length")
            sums[c] = sums[c] + s if c in sums else s
            counts[c] = counts.get(c, 0) + (len(batch) if per_position else int(wc.sum()))
    return {c: s / max(counts[c], 1) for c, s in sums.items()}


@contextlib.contextmanager
def ablate_latents(handle, components: Iterable[str | Component], how: str = "zero",
                   reference: Sequence[str] | dict | None = None, positions=None):
    """Zero- or mean-ablate latents (``how='zero'`` / ``'mean'``; ``reference``: prompts or the
    output of :func:`latent_means`)."""
    comps = latent_components(handle, list(components))
    if how == "zero":
        values = {c: 0.0 for c in comps}
    elif how == "mean":
        if reference is None:
            raise KnoweditError("reference: mean ablation needs reference prompts or precomputed latent_means")
        means = reference if isinstance(reference, dict) else latent_means(handle, reference, comps)
        missing = [c.name for c in comps if c not in means]
        if missing:
            raise KnoweditError(f"reference: no mean for {missing}; compute latent_means for these latents")
        values = {c: means[c] for c in comps}
    else:
        raise KnoweditError(f"how: {how!r} is not an ablation; use 'zero' or 'mean'")
    with write_latents(handle, values, how="set", positions=positions):
        yield


@contextlib.contextmanager
def patch_latents(handle, source: LatentRecording, components: Iterable[str | Component], positions=None):
    """Give latents the values they had in ``source`` (a :class:`LatentRecording` of a batch of the same shape)."""
    comps = latent_components(handle, list(components))
    values = {}
    for c in comps:
        if c not in source:
            raise KnoweditError(f"source: {c.name} was not recorded; record its site in the source run")
        values[c] = source[c]
    with write_latents(handle, values, how="set", positions=positions):
        yield


@contextlib.contextmanager
def steer_latents(handle, values: Mapping[str | Component, object], how: str = "add", positions=None):
    """Steer latents: ``{"r12.f45": 4.0}`` adds 4 to that latent (``how='add'``), or sets / scales it."""
    with write_latents(handle, values, how=how, positions=positions):
        yield


@contextlib.contextmanager
def clamp_latents(handle, values: Mapping[str | Component, object], positions=None):
    """Clamp latents to fixed values (Templeton et al. 2024's feature clamping): ``set`` everywhere or at
    ``positions``."""
    with write_latents(handle, values, how="set", positions=positions):
        yield
