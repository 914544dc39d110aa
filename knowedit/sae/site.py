"""Where an SAE or transcoder sits: after block L on the residual stream (``r{L}``) or on MLP L (``m{L}``),
and how the hookpoint spellings of sparsify, SAELens and Hugging Face map to those sites."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import KnoweditError

# Hookpoint spellings, with the site each names. sparsify names modules relative to the model's base
# ("layers.12", "h.12"; "layers.12.mlp" for a transcoder); SAELens uses TransformerLens hook names, or a
# full Hugging Face module path when trained on an AutoModel.
_RESID = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)(?:\.hook_resid_post)?$")
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
_MLP = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)\.(?:mlp|hook_mlp_out)$")


@dataclass(frozen=True, order=True)
class Site:
    kind: str   # "r": the residual stream after block ``layer``; "m": MLP ``layer``
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}{self.layer}"

    @property
    def component_kind(self) -> str:
        return "resid_latent" if self.kind == "r" else "mlp_latent"

    @staticmethod
    def parse(text: str) -> "Site":
        """``'r12'`` or ``'m7'``."""
        m = re.fullmatch(r"([rm])(\d+)", str(text).strip())
        if not m:
            raise KnoweditError(f"site {text!r}: give 'r{{L}}' (residual stream after block L) or 'm{{L}}' (MLP L)")
        return Site(m.group(1), int(m.group(2)))


def site_of_hookpoint(hookpoint: str) -> Site:
    """The site a hookpoint names, or an error listing the spellings knowedit understands."""
    hp = hookpoint.strip()
    if m := _MLP.match(hp):
        return Site("m", int(m.group(1)))
    if m := _RESID.match(hp):
        return Site("r", int(m.group(1)))
    if m := _RESID_PRE.match(hp):
        if int(m.group(1)) == 0:
            raise KnoweditError(f"hookpoint {hookpoint!r}: the stream entering block 0 is the embedding output; "
                                "knowedit splices SAEs after a block ('blocks.L.hook_resid_post', 'layers.L')")
        return Site("r", int(m.group(1)) - 1)   # the stream entering block L is the one after block L-1
    raise KnoweditError(
        f"hookpoint {hookpoint!r} is not a site knowedit can splice an SAE into; use the residual stream after a "
        "block ('layers.L' as sparsify names it, 'h.L' for GPT-2, 'blocks.L.hook_resid_post' as SAELens names it) "
        "or an MLP ('layers.L.mlp', 'blocks.L.hook_mlp_out')")


def parse_site(text: str) -> Site:
    """A site name (``'r12'``, ``'m7'``) or any hookpoint spelling :func:`site_of_hookpoint` knows."""
    try:
        return Site.parse(text)
    except KnoweditError:
        return site_of_hookpoint(text)


def check_layer(site: Site, handle) -> None:
    n = handle.adapter.n_layers
    if not 0 <= site.layer < n:
        raise KnoweditError(f"SAE site {site}: layer {site.layer} is out of range; this model has layers 0..{n - 1}")


def base_name(handle, module) -> str:
    """The module's name relative to the model's base (``model.base_model``): sparsify's hookpoint names."""
    base = getattr(handle.model, "base_model", handle.model)
    for name, mod in base.named_modules():
        if mod is module:
            return name
    raise KnoweditError("hookpoint: the module is not inside the model's base model")


def sparsify_hookpoint(handle, site: Site) -> str:
    """sparsify's name for a site on this model: ``layers.12`` (Llama), ``h.12`` (GPT-2), ``layers.12.mlp``."""
    a = handle.adapter
    check_layer(site, handle)
    return base_name(handle, a.block(site.layer) if site.kind == "r" else a.mlp(site.layer))
