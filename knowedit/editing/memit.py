"""MEMIT (Meng et al. 2023): many facts at once, spread over several MLP layers.

For each request, z = h̄ᴸ + δ, where hᴸ is the residual stream after the last edit layer L at the
subject's last token (averaged over prefix contexts, as the keys are) and δ is optimised as in ROME
but added to that residual. Then, for each edit layer l in increasing order, on the model with the
lower layers already updated: K = the prefix-averaged keys at l (one column per request),
R = (z − h̄ᴸ_current) / (number of edit layers from l to L), and
ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹, solved in float64, with λ = mom2_update_weight.
"""
from __future__ import annotations

import torch

from ..errors import KnoweditError
from .covariance import key_stats
from .edit import Edit
from .fields import below_loss_layer, field, layer_list
from .keys_values import build_rows, optimise_delta, prefixes, read_at_subject
from .restrict import edit_sites, new_weight, solve_in

MEMIT_DEFAULTS: dict = {
    "layers": [3, 4, 5, 6, 7],
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "v_loss_layer": -1,
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 0.75,
    "kl_factor": 0.0625,
    "mom2_adjustment": True,
    "mom2_update_weight": 15000.0,
    "mom2_dataset": "model_samples",
    "mom2_n_samples": 100,
    "mom2_sample_tokens": 40,
    "mom2_dtype": "float32",
    "context_template_length_params": [[5, 4]],
    "kl_prompts": ["{} is a"],
    "seed": 0,
}


def memit_targets(handle, requests: list, hparams: dict) -> tuple[list[torch.Tensor], list[dict]]:
    """The residual changes δ (z − h̄ᴸ) per request. They depend only on the top edit layer and the
    δ-optimisation fields, so a caller can compute them once and pass them to :func:`apply_memit`
    while trying other λ (mom2_update_weight) or lower layers."""
    from tqdm.auto import tqdm

    hp = {**MEMIT_DEFAULTS, **(hparams or {})}
    a = handle.adapter
    top = max(layer_list(hp, a.n_layers))
    ctx = prefixes(handle, hp)
    targets, infos = [], []
    for r in tqdm(requests, desc="MEMIT targets", leave=False):
        rw = build_rows(handle, r, ctx, kl_prompts=field(hp, "kl_prompts", list))
        delta, info = optimise_delta(handle, r, rw, a.block(top), hp)
        targets.append(delta)
        infos.append(dict(info, case=r.label, top_layer=top))
    return targets, infos


def apply_memit(handle, requests: list, hparams: dict, mask=None, mode: str = "restrict",
                targets: tuple | None = None) -> Edit:
    """Apply MEMIT to a batch of requests; returns the applied Edit (nothing changes on failure).
    ``targets``: the output of :func:`memit_targets` for these requests and the same top layer."""
    from tqdm.auto import tqdm

    hp = {**MEMIT_DEFAULTS, **(hparams or {})}
    a = handle.adapter
    if hp.get("fact_token", "subject_last") != "subject_last":
        raise KnoweditError(f"hparams: field 'fact_token' = {hp['fact_token']!r}; only 'subject_last' is supported")
    layers = layer_list(hp, a.n_layers)
    lam = field(hp, "mom2_update_weight", float, lambda v: v >= 0)
    kl_prompts = field(hp, "kl_prompts", list)
    below_loss_layer(hp, layers, handle.adapter.n_layers)
    sites = edit_sites(handle, layers, mask, mode, "MEMIT")
    top = max(layers)  # z lives after the last *configured* layer, whatever the mask keeps
    stats = key_stats(handle, [l for l, _ in sites], hp)
    ctx = prefixes(handle, hp)
    rows = [build_rows(handle, r, ctx, kl_prompts=kl_prompts) for r in requests]

    if targets is None:
        targets = memit_targets(handle, requests, hp)
    targets, infos = targets
    if len(targets) != len(requests) or any(i.get("top_layer") != top for i in infos):
        raise KnoweditError(f"targets: computed for {len(targets)} requests at top layer "
                            f"{infos[0].get('top_layer') if infos else None}, but this call has {len(requests)} "
                            f"requests and top layer {top}; recompute them with memit_targets")

    def averaged(layer):
        """Prefix-averaged keys at ``layer`` and residual after ``top``, per request."""
        ks, hs = [], []
        for rw in rows:
            k, h = read_at_subject(handle, rw, [layer], site=a.block(top))
            ks.append(k[layer][:rw.n_context].mean(0))
            hs.append(h[:rw.n_context].mean(0))
        return torch.stack(ks), torch.stack(hs)

    params = dict(handle.model.named_parameters())
    names = [a.name_of(a.mlp_out(l).weight) for l, _ in sites]
    originals = {n: params[n].detach().clone() for n in names}
    finals = {}
    try:
        _, h0 = averaged(sites[0][0])
        z = h0 + torch.stack(targets)   # [n, d_model]
        for i, (layer, neurons) in enumerate(tqdm(sites, desc="MEMIT layers", leave=False)):
            K, h = averaged(layer)      # K [n, d_mlp]
            R = (z - h) / (len(sites) - i)
            A = lam * stats[layer].mom2 + K.T @ K
            dW = solve_in(A, K.T @ R, neurons).T   # [d_model, d_mlp]
            if not torch.isfinite(dW).all():
                raise KnoweditError(f"MEMIT: the update at layer {layer} is not finite; raise mom2_update_weight")
            name, new = new_weight(handle, layer, dW, neurons)
            with torch.no_grad():
                params[name].copy_(new)
            finals[name] = new
    finally:
        with torch.no_grad():
            for n, t in originals.items():
                params[n].copy_(t)
    meta = {"layers": [l for l, _ in sites], "neurons": {l: (None if n is None else len(n)) for l, n in sites},
            "covariance": {l: s.source for l, s in stats.items()},
            "covariance_tokens": {l: s.n_tokens for l, s in stats.items()}, "requests": infos, "mode": mode}
    return Edit(handle, finals, "memit", meta).apply()
