"""Sparse autoencoders and transcoders as circuit components.

Load one (sparsify's or SAELens's files, or a hub id), splice it into the model with its error term,
and use its latents (``r12.f45``, ``m7.f3``) like heads and neurons::

    from knowedit.sae import load_sae, ablate_latents
    sae = load_sae("saes/smollm2-135m", handle)           # checks shapes, attaches to the model
    with ablate_latents(handle, ["r12.f45"], how="zero"):
        logits = handle.forward(batch)
"""
from .latents import (LatentRecording, ablate_latents, clamp_latents, latent_means, patch_latents, record_latents,
                      steer_latents, write_latents)
from .load import load_sae
from .registry import attach, attached, detach, sae_at
from .sae import SAE
from .save import save_sparsify
from .shipped import load_shipped_sae, shipped_saes
from .site import Site
from .splice import splice

__all__ = ["LatentRecording", "ablate_latents", "clamp_latents", "latent_means", "patch_latents", "record_latents",
           "steer_latents", "write_latents", "load_sae", "attach", "attached", "detach", "sae_at", "SAE",
           "save_sparsify", "load_shipped_sae", "shipped_saes", "Site", "splice"]
