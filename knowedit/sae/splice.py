"""Splicing an SAE into the forward pass, with its error term.

At a site the model computes ``x`` (the residual stream after block L, or MLP L's output). The spliced
SAE encodes it (a transcoder encodes the MLP's input), the active interventions change the latents
``a`` to ``a'``, and the site's output becomes

    x + decode(a') - decode(a)        (with the error term, the default)
    decode(a')                        (without it: the SAE replaces the site)

With the error term the part of ``x`` the SAE does not explain stays, so only what the interventions
changed moves. Computing it as ``x + Δ`` rather than ``decode(a') + (x - decode(a))`` keeps it exact:
with no intervention, or one that only reads, the hook returns ``x`` itself, bit for bit, and an
intervention that changes nothing adds an exact zero.

Each sequence's first position is left to the model when ``sae.skip_first`` (the default; see
:mod:`knowedit.sae.sae`): its latents read as zero and nothing is written there, with or without the
error term.

A splice installs one hook; interventions (``knowedit.sae.latents``) register operations on it while
their block runs. Operations see the latents ``[B, T, width]`` and return new ones (or None to leave
them)."""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch

from ..errors import KnoweditError
from ..hooks.hookset import HookSet
from .load import check_against
from .registry import sae_at
from .sae import SAE
from .site import Site

Op = Callable[[torch.Tensor], "torch.Tensor | None"]
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {Site: Splice}


class Splice:
    def __init__(self, handle, sae: SAE, error_term: bool = True):
        self.handle, self.sae, self.error_term = handle, sae, error_term
        self.ops: list[Op] = []

    @property
    def site(self) -> Site:
        return self.sae.site

    def module(self):
        a = self.handle.adapter
        return a.block(self.site.layer) if self.site.kind == "r" else a.mlp(self.site.layer)

    def _latents(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.sae.skip_first
        with torch.no_grad():
            acts = self.sae.encode(x_in)
            if skip:
                acts[:, 0] = 0   # the attention sink: no latents read there
        new = acts
        for op in list(self.ops):
            r = op(new)
            if r is not None:
                new = r
        if skip and new is not acts:   # ... and none written there
            new = torch.cat([acts[:, :1], new[:, 1:]], 1)
        return acts, new

    def _hook(self, mod, args, kwargs, out):
        if not self.ops and self.error_term:
            return None   # nothing to do: the model's own output, untouched
        x = out[0] if isinstance(out, tuple) else out
        if self.sae.kind == "transcoder":
            x_in = args[0] if args else next(iter(kwargs.values()))
        else:
            x_in = x
        acts, new = self._latents(x_in)
        if self.error_term:
            if new is acts:
                return None
            y = x + self.sae.decode_delta(new - acts, x_in).to(x.dtype)
        else:
            y = self.sae.decode(new, x_in).to(x.dtype)
            if self.sae.skip_first:
                y = torch.cat([x[:, :1], y[:, 1:]], 1)
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y


def active(handle, site: Site) -> Splice | None:
    return _ACTIVE.get(handle.model, {}).get(site)


@contextlib.contextmanager
def splice(handle, sae: SAE | None = None, error_term: bool = True, site: Site | str | None = None):
    """Splice ``sae`` (default: the SAE attached at ``site``) into the model while the block runs.

    Yields the :class:`Splice`. With ``error_term=True`` and no intervention the model's outputs are
    unchanged bit for bit; ``error_term=False`` replaces the site by the SAE's reconstruction (how the
    SAE's own loss is measured)."""
    if sae is None:
        if site is None:
            raise KnoweditError("splice: give an SAE or the site of an attached one (e.g. site='r12')")
        sae = sae_at(handle, site if isinstance(site, Site) else Site.parse(site))
    if sae.site is None:
        raise KnoweditError("sae: its site is unknown; load it with a hookpoint (load_sae(path, handle, hookpoint=...))")
    check_against(sae, handle)
    cur = active(handle, sae.site)
    if cur is not None:
        if cur.sae is sae and cur.error_term == error_term:
            yield cur   # already spliced the same way: nest without a second hook
            return
        raise KnoweditError(f"splice: an SAE is already spliced at {sae.site}; leave that block first (one SAE per "
                            "site at a time)")
    sp = Splice(handle, sae, error_term)
    table = _ACTIVE.setdefault(handle.model, {})
    with HookSet() as hs:
        hs._handles.append(sp.module().register_forward_hook(sp._hook, with_kwargs=True))
        table[sae.site] = sp
        try:
            yield sp
        finally:
            table.pop(sae.site, None)


@contextlib.contextmanager
def operations(handle, ops: dict[Site, list[Op]]):
    """Run ``ops`` on the latents at each site while the block runs, splicing the attached SAE (with
    its error term) at sites where none is spliced yet. Validate everything before calling: nothing
    is installed if this raises."""
    saes = {s: (active(handle, s).sae if active(handle, s) else sae_at(handle, s)) for s in ops}
    with contextlib.ExitStack() as stack:
        for s, fns in ops.items():
            sp = active(handle, s) or stack.enter_context(splice(handle, saes[s]))
            sp.ops.extend(fns)
            stack.callback(_remove, sp.ops, fns)
        yield


def _remove(lst: list, fns: list) -> None:
    for f in fns:
        if f in lst:
            lst.remove(f)
