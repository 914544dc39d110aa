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
from tqdm.auto import tqdm

from ..errors import KnoweditError
from ..models.weights import write_param
from .batched_values import optimise_in_batches
from .covariance import SETTINGS_DEFAULTS, key_stats
from .edit import Edit
from .fields import below_loss_layer, field, layer_list
from .keys_values import Rows, build_rows, context_weights, prefix_groups, prefixes, read_at_subject, stack_rows
from .errors import EditRefused
from .preserve import PRESERVE_DEFAULTS, free_share, preserve_settings, update_space
from .restrict import edit_sites, weight_change
from .subspace import as_subspace, solve_in

_READ_CHUNK = 32   # requests per forward when reading keys and residuals


def stack_contexts(rows: list[Rows], pad_id: int) -> Rows:
    """The context rows (not the KL rows) of several requests as one right-padded batch, request by
    request."""
    return stack_rows(rows, pad_id, lambda r: r.n_context)


MEMIT_DEFAULTS: dict = {
    "layers": [3, 4, 5, 6, 7],
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "v_stop_loss": 5e-2,
    "v_batch_size": 16,
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
    **PRESERVE_DEFAULTS,
    "seed": 0,
}


def memit_targets(handle, requests: list, hparams: dict) -> tuple[list[torch.Tensor], list[dict]]:
    """The residual changes δ (z − h̄ᴸ) per request. They depend only on the top edit layer and the
    δ-optimisation fields, so a caller can compute them once and pass them to :func:`apply_memit`
    while trying other λ (mom2_update_weight) or lower layers. ``v_batch_size`` requests are optimised
    together, each as if alone (:mod:`.batched_values`)."""
    from .auto_layers import resolve
    hp, _ = resolve(handle, requests, {**MEMIT_DEFAULTS, **(hparams or {})}, "memit")
    a = handle.adapter
    top = max(layer_list(hp, a.n_layers))
    batch = field(hp, "v_batch_size", int, lambda v: v >= 1, "at least one request")
    ctx = prefixes(handle, hp)
    rows = [build_rows(handle, r, ctx, kl_prompts=field(hp, "kl_prompts", list)) for r in requests]
    targets, infos = optimise_in_batches(handle, rows, a.block(top), hp, batch, desc="MEMIT targets")
    return targets, [dict(i, case=r.label, top_layer=top) for i, r in zip(infos, requests)]


def spread_update(handle, requests: list, hp: dict, sites: list, targets: tuple, solve, after=None,
                  screen=None) -> tuple[dict, object, list[int]]:
    """MEMIT's spread of z − h over ``sites`` (``[(layer, neurons)]``, increasing): for each layer, on the
    model with the lower layers already updated, K (context-averaged keys, ``[n, d_mlp]``) and
    R = (z − h) / (layers left); ``solve(layer, K, R)`` returns ΔWᵀ ``[d_mlp, d_model]``. ``after(keys)``,
    when given, runs on the fully edited model with ``keys(layer)`` → K there (AlphaEdit records the
    edited keys). ``screen(layer, K)``, when given, runs first at every layer on the model as it is and
    returns the requests (bool ``[n]``) the update can serve; the others are left out of the batch. The
    model is restored before returning ({param name: Change}, after's result, the kept positions)."""
    a = handle.adapter
    top = max(layer_list(hp, a.n_layers))
    weights = context_weights(prefix_groups(handle, hp), per_type=True)
    ctx = prefixes(handle, hp)
    kl_prompts = field(hp, "kl_prompts", list)
    rows = [build_rows(handle, r, ctx, kl_prompts=kl_prompts) for r in requests]
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

    kept = list(range(len(requests)))
    if screen is not None:
        ok = torch.ones(len(requests), dtype=torch.bool)
        for layer, _ in sites:
            ok &= screen(layer, averaged(layer)[0]).cpu()
        kept = ok.nonzero().flatten().tolist()
        if not kept:
            why = "; ".join(f"{r['case']}: {r['reason']}" for r in getattr(screen, "refused", [])[:3])
            raise EditRefused(f"every request of the batch was refused ({why}{'; ...' if len(requests) > 3 else ''}); "
                              "preserve fewer tasks, raise preserve_threshold, or edit other layers")
        rows = [rows[i] for i in kept]
        targets = [targets[i] for i in kept]
    finals, extra = {}, None   # {param name: Change}; each layer is written once, so .old is the original
    try:
        _, h0 = averaged(sites[0][0])
        z = h0 + torch.stack(targets)   # [n, d_model]
        for i, (layer, neurons) in enumerate(tqdm(sites, desc="update layers", leave=False)):
            K, h = averaged(layer)      # K [n, d_mlp]
            R = (z - h) / (len(sites) - i)
            dW = solve(layer, K, R).T   # [d_model, d_mlp]
            if not torch.isfinite(dW).all():
                raise KnoweditError(f"the update at layer {layer} is not finite; raise the regularisation "
                                    "(mom2_update_weight for MEMIT, L2 for AlphaEdit)")
            name, change = weight_change(handle, layer, dW, neurons)
            write_param(handle.model, name, change.new, change.dim, change.index)
            finals[name] = change
        if after is not None:
            extra = after(lambda layer: averaged(layer)[0])
    finally:
        for n, c in finals.items():
            write_param(handle.model, n, c.old, c.dim, c.index)
    return finals, extra, kept


def preserve_screen(spaces: dict, preserve: dict | None, labels: list[str], refused: list):
    """The ``screen`` of :func:`spread_update` for preserved tasks: a request whose key at some edited
    layer lies almost wholly in the preserved span (under ``preserve_min_free`` of its norm outside it)
    is refused alone, recorded in ``refused``, and the rest of the batch is edited. None without
    preserved tasks."""
    if not preserve:
        return None
    worst: dict[int, tuple] = {}

    def screen(layer, K):
        shares = free_share(spaces[layer], K)
        for i, sh in enumerate(shares.tolist()):
            if sh < preserve["min_free"] and (i not in worst or sh < worst[i][0]):
                worst[i] = (sh, layer)
        ok = shares >= preserve["min_free"]
        if layer == max(spaces):
            refused.extend({"position": i, "case": labels[i], "free_share": sh, "layer": l,
                            "reason": f"{sh:.1%} of the key at layer {l} lies outside the span the preserved tasks "
                                      f"use (preserve_min_free {preserve['min_free']})"}
                           for i, (sh, l) in sorted(worst.items()))
        return ok
    screen.refused = refused
    return screen


def preserved_solve(layer: int, space, preserve: dict | None, K: torch.Tensor, infos: list, A: torch.Tensor,
                    rhs: torch.Tensor, neurons) -> torch.Tensor:
    """``solve_in(A, rhs, space)``, and, when tasks are preserved, how much of each key the allowed
    directions reach and the share of the unprojected update the projection removed (in ``infos``)."""
    dWt = solve_in(A, rhs, space)
    if preserve:
        shares = free_share(space, K).tolist()
        free = solve_in(A, rhs, neurons)
        removed = float((free - as_subspace(space, A.shape[0]).project(free)).norm() / free.norm())
        infos.append({"layer": layer, "removed": removed, "free_share_min": min(shares),
                      "free_share_mean": sum(shares) / len(shares)})
    return dWt


def apply_memit(handle, requests: list, hparams: dict, mask=None, mode: str = "restrict",
                targets: tuple | None = None) -> Edit:
    """Apply MEMIT to a batch of requests; returns the applied Edit (nothing changes on failure).
    ``targets``: the output of :func:`memit_targets` for these requests and the same top layer."""
    from .auto_layers import resolve
    hp, auto = resolve(handle, requests, {**MEMIT_DEFAULTS, **(hparams or {})}, "memit", mask)
    a = handle.adapter
    if hp.get("fact_token", "subject_last") != "subject_last":
        raise KnoweditError(f"hparams: field 'fact_token' = {hp['fact_token']!r}; only 'subject_last' is supported")
    layers = layer_list(hp, a.n_layers)
    lam = field(hp, "mom2_update_weight", float, lambda v: v >= 0)
    field(hp, "kl_prompts", list)
    preserve = preserve_settings(hp)
    below_loss_layer(hp, layers, handle.adapter.n_layers)
    sites = edit_sites(handle, layers, mask, mode, "MEMIT")
    spaces, pinfo = {}, {}
    for l, n in sites:
        spaces[l], pinfo[l] = update_space(handle, l, n, preserve)
    stats = key_stats(handle, [l for l, _ in sites], hp)
    if targets is None:
        targets = memit_targets(handle, requests, hp)
    removed, refused = [], []

    def solve(layer, K, R):
        K, R = K.to(stats[layer].mom2.device), R.to(stats[layer].mom2.device)   # solved where the statistics are
        A = lam * stats[layer].mom2 + K.T @ K
        return preserved_solve(layer, spaces[layer], preserve, K, removed, A, K.T @ R, dict(sites)[layer])

    finals, _, _ = spread_update(handle, requests, hp, sites, targets, solve,
                                 screen=preserve_screen(spaces, preserve, [r.label for r in requests], refused))
    meta = {"layers": [l for l, _ in sites], "neurons": {l: (None if n is None else len(n)) for l, n in sites},
            "covariance": {l: s.source for l, s in stats.items()},
            "covariance_tokens": {l: s.n_tokens for l, s in stats.items()}, "requests": targets[1], "mode": mode}
    if preserve:
        meta["preserve"] = {"tasks": preserve["tasks"], "layers": pinfo, "projection": removed}
        meta["refused"] = refused
    if auto is not None:
        meta["auto_layers"] = auto
    return Edit(handle, finals, "memit", meta).apply()
