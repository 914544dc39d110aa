"""MEMIT (Meng et al. 2023): many facts at once, spread over several MLP layers.

For each request, z = hᴸ + δ, where hᴸ is the residual stream after the last edit layer L at the
subject's last token of the bare prompt and δ is optimised as in ROME but added to that residual (on
every context row). Then, for each edit layer l in increasing order, on the model with the lower
layers already updated: K = the keys at l averaged within each context type and then across types
(the bare prompt weighs one half with one prefix length), one column per request;
R = (z − hᴸ_current on the bare prompt) / (number of edit layers from l to L), and
ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹, solved in float64, with λ = mom2_update_weight.
"""
from __future__ import annotations

import torch

from ..errors import KnoweditError
from ..models.handle import Batch
from .covariance import SETTINGS_DEFAULTS, key_stats
from .edit import Edit
from .fields import below_loss_layer, field, layer_list
from .keys_values import Rows, build_rows, context_weights, optimise_delta, prefix_groups, prefixes, read_at_subject
from .restrict import edit_sites, new_weight, solve_in

_READ_CHUNK = 32   # requests per forward when reading keys and residuals


def stack_contexts(rows: list[Rows], pad_id: int) -> Rows:
    """The context rows (not the KL rows) of several requests as one right-padded batch, request by
    request."""
    seqs = [r.input_ids[i, :int(r.attention_mask[i].sum())].tolist() for r in rows for i in range(r.n_context)]
    b = Batch.from_ids(seqs, pad_id, rows[0].input_ids.device)
    subj = torch.cat([r.subject_pos[:r.n_context] for r in rows])
    return Rows(b.input_ids, b.attention_mask, subj, len(seqs), [], [])


MEMIT_DEFAULTS: dict = {
    "layers": [3, 4, 5, 6, 7],
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "v_stop_loss": 5e-2,
    "cache_before_subject": True,
    "v_loss_layer": -1,
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 0.75,
    "kl_factor": 0.0625,
    "mom2_adjustment": True,
    "mom2_update_weight": 15000.0,
    **SETTINGS_DEFAULTS,
    "context_template_length_params": [[10, 5]],
    "kl_prompts": ["{} is a"],
    "seed": 0,
}


def memit_targets(handle, requests: list, hparams: dict) -> tuple[list[torch.Tensor], list[dict]]:
    """The residual changes δ (z − h̄ᴸ) per request. They depend only on the top edit layer and the
    δ-optimisation fields, so a caller can compute them once and pass them to :func:`apply_memit`
    while trying other λ (mom2_update_weight) or lower layers."""
    from tqdm.auto import tqdm

    from .auto_layers import resolve
    hp, _ = resolve(handle, requests, {**MEMIT_DEFAULTS, **(hparams or {})}, "memit")
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

    from .auto_layers import resolve
    hp, auto = resolve(handle, requests, {**MEMIT_DEFAULTS, **(hparams or {})}, "memit", mask)
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
    weights = context_weights(prefix_groups(handle, hp), per_type=True)
    rows = [build_rows(handle, r, ctx, kl_prompts=kl_prompts) for r in requests]

    if targets is None:
        targets = memit_targets(handle, requests, hp)
    targets, infos = targets
    if len(targets) != len(requests) or any(i.get("top_layer") != top for i in infos):
        raise KnoweditError(f"targets: computed for {len(targets)} requests at top layer "
                            f"{infos[0].get('top_layer') if infos else None}, but this call has {len(requests)} "
                            f"requests and top layer {top}; recompute them with memit_targets")

    def averaged(layer):
        """Context-averaged keys at ``layer`` and the bare prompt's residual after ``top``, per request:
        the context rows of several requests run in one forward."""
        ks, hs = [], []
        for i in range(0, len(rows), _READ_CHUNK):
            chunk = rows[i:i + _READ_CHUNK]
            k, h = read_at_subject(handle, stack_contexts(chunk, handle.tokenizer.pad_token_id), [layer],
                                   site=a.block(top))
            n = chunk[0].n_context
            ks.append(torch.einsum("c,rcd->rd", weights.to(k[layer]), k[layer].view(len(chunk), n, -1)))
            hs.append(h.view(len(chunk), n, -1)[:, 0])
        return torch.cat(ks), torch.cat(hs)

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
    if auto is not None:
        meta["auto_layers"] = auto
    return Edit(handle, finals, "memit", meta).apply()
