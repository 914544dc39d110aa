"""Which SAE a model's latent names (``r12.f45``) refer to: at most one SAE per site and model.

Kept beside the model (weakly, so a dropped model takes its SAEs with it) rather than on the handle:
every handle of the same model sees the same SAEs, and nothing in :mod:`knowedit.models` changes."""
from __future__ import annotations

import weakref

from ..errors import KnoweditError
from ..models.components import Component
from .sae import SAE
from .site import Site, check_layer

_ATTACHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {Site: SAE}


def attach(handle, sae: SAE) -> SAE:
    """Make ``sae`` the SAE that latent names at its site refer to on this model (replacing any other)."""
    if sae.site is None:
        raise KnoweditError("sae: its site is unknown; load it with a hookpoint (load_sae(path, handle, hookpoint=...))")
    check_layer(sae.site, handle)
    _ATTACHED.setdefault(handle.model, {})[sae.site] = sae
    return sae


def detach(handle, site: Site | str | None = None) -> None:
    """Forget the SAE at ``site`` (all of this model's SAEs when None)."""
    saes = _ATTACHED.get(handle.model, {})
    if site is None:
        saes.clear()
    else:
        saes.pop(site if isinstance(site, Site) else Site.parse(site), None)


def attached(handle) -> dict[Site, SAE]:
    return dict(_ATTACHED.get(handle.model, {}))


def sae_at(handle, site: Site) -> SAE:
    sae = _ATTACHED.get(handle.model, {}).get(site)
    if sae is None:
        have = ", ".join(str(s) for s in sorted(attached(handle))) or "none"
        raise KnoweditError(f"latents at {site}: no SAE is loaded for this site of {handle.name} (loaded: {have}); "
                            f"load one with knowedit.sae.load_sae(path, handle) or attach(handle, sae)")
    return sae


def latent_components(handle, names) -> list[Component]:
    """Parse latent names and check each index against its site's SAE."""
    out = []
    for n in names:
        c = handle.component(n)
        if not isinstance(c, Component) or not c.is_latent:
            raise KnoweditError(f"{n!r} is not an SAE latent; latent names look like 'r12.f45' (residual stream "
                                "after block 12) or 'm7.f3' (transcoder of MLP 7)")
        sae_at(handle, site_of(c)).check_index(c.index, c.name)
        out.append(c)
    return out


def site_of(c: Component) -> Site:
    return Site("r" if c.kind == "resid_latent" else "m", c.layer)
