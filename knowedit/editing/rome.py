"""ROME (Meng et al. 2022): a rank-one update of one MLP down projection.

k̄ = the down-projection input at the subject's last token, averaged over the prefix contexts (the
bare prompt among them); k = the same on the bare prompt alone; v* = v + δ, where v is the MLP output
on the bare prompt and δ the change that makes the model say the new target
(keys_values.optimise_delta); u = C⁻¹ k̄. ``rome_variant`` chooses the key the update maps to v*:

* ``rome`` (Meng et al. 2022): ΔW = δ uᵀ / (uᵀ k), so W' k = v*. When uᵀk is small compared with uᵀk̄
  the update explodes and disables the model (Gupta et al. 2024); such edits are refused.
* ``r-rome`` (Gupta et al. 2024, "Rebuilding ROME"): ΔW = (v* − W k̄) uᵀ / (uᵀ k̄), so W' k̄ = v*.
* ``hybrid`` (knowedit before version 0.2): ΔW = δ uᵀ / (uᵀ k̄), so W' k̄ = W k̄ + δ: r-ROME's
  denominator with ROME's numerator.

Several requests are applied one after another, each computed on the model with the previous ones
applied, and returned as one Edit.
"""
from __future__ import annotations

import torch

from ..errors import KnoweditError
from ..models.weights import read_param, write_param
from .change import Change
from .covariance import SETTINGS_DEFAULTS, key_stats
from .edit import Edit
from .errors import EditRefused
from .fields import below_loss_layer, field, layer_list
from .keys_values import build_rows, optimise_delta, prefixes, read_at_subject
from .preserve import PRESERVE_DEFAULTS, check_free, preserve_settings, update_space
from .restrict import edit_sites, solve_in, weight_change
from .subspace import as_subspace

VARIANTS = ("rome", "r-rome", "hybrid")

ROME_DEFAULTS: dict = {
    "layers": [5],
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "v_stop_loss": 5e-2,
    "cache_before_subject": True,
    "v_loss_layer": -1,          # -1 = the last layer
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 4.0,
    "kl_factor": 0.0625,
    "mom2_adjustment": True,
    **SETTINGS_DEFAULTS,
    "mom2_ridge": 1e-3,           # C + ridge·mean(diag C)·I; 0 = the papers' plain C
    "context_template_length_params": [[5, 10], [10, 10]],
    "kl_prompts": ["{} is a"],
    "rome_variant": "rome",        # measured best on the default model (editors/README.md)
    "min_denominator_ratio": 0.1,   # refuse when uᵀk_d < this · uᵀk̄
    "max_update_ratio": 1.0,        # refuse when ‖ΔW‖_F > this · ‖W‖_F
    **PRESERVE_DEFAULTS,
    "seed": 0,
}


def check_hparams(hp: dict, n_layers: int) -> dict:
    if hp.get("fact_token", "subject_last") != "subject_last":
        raise KnoweditError(f"hparams: field 'fact_token' = {hp['fact_token']!r}; only 'subject_last' is supported")
    kl = field(hp, "kl_prompts", list)
    for p in kl:
        if not isinstance(p, str) or p.count("{}") != 1:
            raise KnoweditError(f"hparams: field 'kl_prompts' holds {p!r}; each needs exactly one '{{}}'")
    return {"layers": layer_list(hp, n_layers), "kl_prompts": kl,
            "variant": field(hp, "rome_variant", str, lambda v: v in VARIANTS, f"choose one of {', '.join(VARIANTS)}"),
            "min_den": field(hp, "min_denominator_ratio", float, lambda v: v >= 0),
            "max_update": field(hp, "max_update_ratio", float, lambda v: v > 0),
            "ridge": field(hp, "mom2_ridge", float, lambda v: v >= 0),
            "preserve": preserve_settings(hp)}


def rank_one(C: torch.Tensor, k_mean: torch.Tensor, k_den: torch.Tensor, residual: torch.Tensor,
             space) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """ΔW = left rightᵀ ``[d_model, d_mlp]`` as its float64 factors, with ΔW k_den = residual, along
    u = C⁻¹ k̄ restricted to ``space`` (neuron indices, a :class:`~knowedit.editing.subspace.Subspace`,
    or None), and the denominators. Solved where the statistics are."""
    k_mean, k_den, residual = (t.to(C.device, torch.float64) for t in (k_mean, k_den, residual))
    u = solve_in(C, k_mean, space)
    den, den_ref = float(u @ k_den), float(u @ k_mean)
    return (residual / den, u), {"denominator": den, "denominator_mean_key": den_ref}


def variant_target(variant: str, W: torch.Tensor | None, k_mean: torch.Tensor, k_plain: torch.Tensor,
                   delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the key the update is solved at, the change ΔW must make at that key), W as ``[out, in]``
    (read by ``r-rome`` only)."""
    if variant == "rome":
        return k_plain, delta
    if variant == "r-rome":   # v* − W k̄ = (W k + δ) − W k̄ (a bias cancels)
        return k_mean, delta + W @ (k_plain - k_mean)
    return k_mean, delta


def key_and_delta(handle, req, hp: dict, layer: int, opts: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(k̄, k of the bare prompt, δ, info) for one request: everything of ROME that does not depend on
    the covariance or the variant (the model is read, not changed)."""
    a = handle.adapter
    rows = build_rows(handle, req, prefixes(handle, hp), kl_prompts=opts["kl_prompts"])
    keys, v0 = read_at_subject(handle, rows, [layer], site=a.mlp_out(layer))
    k = keys[layer][:rows.n_context]
    delta, info = optimise_delta(handle, req, rows, a.mlp_out(layer), hp, v0=v0[0])
    info.update(layer=layer, n_contexts=rows.n_context, case=req.label)
    return k.mean(0), k[0], delta, info


def _norm64(w: torch.Tensor, rows: int = 256) -> float:
    """‖w‖_F accumulated in float64, a block of rows at a time (no float64 copy of the whole matrix)."""
    return sum(float(b.double().square().sum()) for b in w.split(rows)) ** 0.5


def rome_change(handle, req, layer: int, space, C: torch.Tensor, opts: dict, k_mean, k_plain, delta,
                info: dict) -> tuple[str, Change]:
    """The checked rank-one update of ``opts["variant"]``: the parameter name and its
    :class:`~.change.Change` (rank-one factors). ``space``: the neurons the update may write (None:
    all), or a Subspace that also keeps it off the preserved tasks' keys."""
    mod = handle.adapter.mlp_out(layer)
    name = handle.adapter.name_of(mod.weight)
    stored = read_param(handle.model, name)
    # a float64 copy of W (the size of a layer of a 7B model) only for the variant that multiplies by it
    w = None
    if opts["variant"] == "r-rome":
        w = stored.to(k_mean.device, torch.float64)
        w = w.T if handle.adapter.out_dim(mod) == 1 else w   # [out, in]
    k_den, residual = variant_target(opts["variant"], w, k_mean, k_plain, delta)
    sp = as_subspace(space, len(k_mean))
    if sp.basis is not None and opts.get("preserve"):
        info["preserve_free_share"] = check_free(sp, k_den, [req.label], opts["preserve"], "ROME")[0]
        u_free = solve_in(C, k_mean.to(C.device), sp.neurons)   # the update's direction without the projection
        info["preserve_removed"] = float((u_free - sp.project(u_free)).norm() / u_free.norm())
    (left, right), den = rank_one(C, k_mean, k_den, residual, space)
    norm = left.norm() * right.norm()   # ‖a bᵀ‖_F = ‖a‖ ‖b‖
    ratio = float(norm / _norm64(stored))
    info.update(den, variant=opts["variant"], update_ratio=ratio)
    if den["denominator_mean_key"] <= 0 or den["denominator"] < opts["min_den"] * den["denominator_mean_key"]:
        raise EditRefused(f"{req.label}: ROME denominator uᵀk = {den['denominator']:.3g} is too small compared with "
                          f"uᵀk̄ = {den['denominator_mean_key']:.3g} (min_denominator_ratio {opts['min_den']}); the "
                          "update would disable the model. Use rome_variant 'r-rome' (the prefix-averaged key) "
                          "or another layer")
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()) or not ratio <= opts["max_update"]:
        raise EditRefused(f"{req.label}: ROME update norm ‖ΔW‖/‖W‖ = {ratio:.3g} exceeds max_update_ratio "
                          f"{opts['max_update']}; the edit would disable the model (try another layer, or more "
                          "covariance samples)")
    return weight_change(handle, layer, (left, right), sp.neurons)


def rome_update(handle, req, layer: int, space, C: torch.Tensor, opts: dict, k_mean, k_plain, delta,
                info: dict) -> tuple[str, torch.Tensor]:
    """:func:`rome_change` as the parameter name and its full new value."""
    name, c = rome_change(handle, req, layer, space, C, opts, k_mean, k_plain, delta, info)
    return name, c.scatter(read_param(handle.model, name), c.new)


def compute_rome(handle, req, hp: dict, layer: int, space, C: torch.Tensor, opts: dict) -> tuple[str, Change, dict]:
    """The change of the down-projection weight for one request (the model is read, not changed)."""
    k_mean, k_plain, delta, info = key_and_delta(handle, req, hp, layer, opts)
    name, change = rome_change(handle, req, layer, space, C, opts, k_mean, k_plain, delta, info)
    return name, change, info


def apply_rome(handle, requests: list, hparams: dict, mask=None, mode: str = "restrict") -> Edit:
    """Apply ROME for each request in turn; returns the applied Edit (nothing changes on failure)."""
    from .auto_layers import resolve
    hp, auto = resolve(handle, requests, {**ROME_DEFAULTS, **(hparams or {})}, "rome", mask)
    opts = check_hparams(hp, handle.adapter.n_layers)
    if len(opts["layers"]) != 1:
        raise KnoweditError(f"hparams: field 'layers' = {opts['layers']}; ROME edits exactly one layer "
                            "(use MEMIT for several)")
    below_loss_layer(hp, opts["layers"], handle.adapter.n_layers)
    sites = edit_sites(handle, opts["layers"], mask, mode, "ROME")
    layer, neurons = sites[0]
    space, pinfo = update_space(handle, layer, neurons, opts["preserve"])
    stats = key_stats(handle, [layer], hp)[layer]
    C = stats.regularised(opts["ridge"])
    cov = {"covariance": stats.source, "covariance_tokens": stats.n_tokens}
    del stats   # only C is needed from here: one d_mlp² float64 matrix, not two, while δ is optimised
    infos, change = [], None
    try:
        for req in requests:   # each request sees the previous ones applied
            name, c, info = compute_rome(handle, req, hp, layer, space, C, opts)
            infos.append(info)
            change = c if change is None else change.then(c)   # first, so a failed write is undone too
            write_param(handle.model, name, c.new, c.dim, c.index)
    finally:
        if change is not None:
            write_param(handle.model, name, change.old, change.dim, change.index)
    meta = {"layer": layer, "neurons": None if neurons is None else len(neurons), **cov,
            "variant": opts["variant"], "requests": infos, "mode": mode}
    if pinfo is not None:
        meta["preserve"] = pinfo
    if auto is not None:
        meta["auto_layers"] = auto
    return Edit(handle, {name: change}, "rome", meta).apply()
