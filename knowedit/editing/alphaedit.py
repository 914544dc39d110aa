"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of preserved knowledge.

P = B Bᵀ, B the eigenvectors of the key covariance C = E[k kᵀ] (the same statistics ROME and MEMIT
use) whose eigenvalue is below ``nullspace_threshold``; the paper's 2e-2 is on GPT-2 XL/GPT-J/Llama-3
keys, so the default model's file sets its own, and every edit records how many of the key dimensions
the null space keeps. z and the spread over layers are MEMIT's (:mod:`knowedit.editing.memit`). At
each layer

    ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + L2·I)⁻¹

with K the batch's context-averaged keys, R the residual share of the layer and K_p the keys of the
edits made earlier in a lifelong run (read on the model after each batch, as the reference does, and
kept in the caller's ``state``). Solved in float64 in B's coordinates (see
:mod:`knowedit.editing.subspace`), so ΔW (I − P) = 0 exactly. A circuit mask confines B to its
neurons' columns; ``preserve`` additionally removes the preserved tasks' key span.
"""
from __future__ import annotations

import torch

from ..errors import KnoweditError
from .covariance import key_stats
from .edit import Edit
from .fields import below_loss_layer, field, layer_list
from .memit import MEMIT_DEFAULTS, memit_targets, preserve_screen, preserved_solve, spread_update
from .preserve import preserve_settings, update_space
from .restrict import edit_sites
from .subspace import knowledge_null_space

ALPHAEDIT_DEFAULTS: dict = {
    **MEMIT_DEFAULTS,
    "nullspace_threshold": 2e-2,
    "L2": 10.0,
}
STATE_KEY = "alphaedit_prior_keys"   # state[STATE_KEY][layer] = K_p K_pᵀ (float64), summed over earlier edits

_null_cache: dict[tuple, tuple[torch.Tensor, dict]] = {}


def null_space(handle, layer: int, neurons, stats, threshold: float) -> tuple[torch.Tensor, dict]:
    """AlphaEdit's null-space basis at ``layer`` (cached per model, statistics, neurons and threshold)."""
    key = (handle.fingerprint, layer, stats.source, stats.n_tokens, threshold,
           None if neurons is None else tuple(int(i) for i in neurons))
    if key not in _null_cache:
        B, info = knowledge_null_space(stats.mom2, neurons, threshold)
        if B.shape[1] == 0:
            raise KnoweditError(f"hparams: field 'nullspace_threshold' = {threshold:g} leaves an empty null space at "
                                f"layer {layer} (the smallest covariance eigenvalue there is {info['eig_min']:.3g}); "
                                f"raise it above {info['eig_min']:.3g}")
        _null_cache[key] = (B, info)
    return _null_cache[key]


def prior_keys(state: dict | None, layer: int, d: int) -> torch.Tensor:
    if state is None or layer not in state.get(STATE_KEY, {}):
        return torch.zeros(d, d, dtype=torch.float64)
    return state[STATE_KEY][layer]


def apply_alphaedit(handle, requests: list, hparams: dict, mask=None, mode: str = "restrict",
                    targets: tuple | None = None, state: dict | None = None) -> Edit:
    """Apply AlphaEdit to a batch of requests; returns the applied Edit (nothing changes on failure).
    ``state``: the lifelong run's memory (see :func:`knowedit.editing.edit`); this batch's edited keys
    are added to it once the edit is applied."""
    from .auto_layers import resolve
    hp, auto = resolve(handle, requests, {**ALPHAEDIT_DEFAULTS, **(hparams or {})}, "alphaedit", mask)
    a = handle.adapter
    if hp.get("fact_token", "subject_last") != "subject_last":
        raise KnoweditError(f"hparams: field 'fact_token' = {hp['fact_token']!r}; only 'subject_last' is supported")
    layers = layer_list(hp, a.n_layers)
    threshold = field(hp, "nullspace_threshold", float, lambda v: v > 0, "a positive eigenvalue bound")
    l2 = field(hp, "L2", float, lambda v: v >= 0)
    field(hp, "kl_prompts", list)
    preserve = preserve_settings(hp)
    below_loss_layer(hp, layers, a.n_layers)
    sites = edit_sites(handle, layers, mask, mode, "AlphaEdit")
    stats = key_stats(handle, [l for l, _ in sites], hp)
    spaces, null_info, pinfo = {}, {}, {}
    for l, n in sites:
        B, null_info[l] = null_space(handle, l, n, stats[l], threshold)
        spaces[l], pinfo[l] = update_space(handle, l, n, preserve, null_basis=B)
    if targets is None:
        targets = memit_targets(handle, requests, hp)
    removed, refused = [], []
    d = a.d_mlp
    eye = torch.eye(d, dtype=torch.float64)

    def solve(layer, K, R):
        K, R = K.to(stats[layer].mom2.device), R.to(stats[layer].mom2.device)   # solved where the statistics are
        A = prior_keys(state, layer, d) + K.T @ K + l2 * eye
        return preserved_solve(layer, spaces[layer], preserve, K, removed, A, K.T @ R, dict(sites)[layer])

    def edited_keys(keys):
        out = {}
        for l, _ in sites:
            K = keys(l)
            out[l] = K.T @ K
        return out

    finals, new_prior, kept = spread_update(
        handle, requests, hp, sites, targets, solve, after=edited_keys if state is not None else None,
        screen=preserve_screen(spaces, preserve, [r.label for r in requests], refused))
    meta = {"layers": [l for l, _ in sites], "neurons": {l: (None if n is None else len(n)) for l, n in sites},
            "null_space": null_info, "L2": l2, "covariance": {l: s.source for l, s in stats.items()},
            "covariance_tokens": {l: s.n_tokens for l, s in stats.items()}, "requests": targets[1], "mode": mode,
            "prior_edits": 0 if state is None else int(state.get("alphaedit_edits", 0))}
    if preserve:
        meta["preserve"] = {"tasks": preserve["tasks"], "layers": pinfo, "projection": removed}
        meta["refused"] = refused
    if auto is not None:
        meta["auto_layers"] = auto
    e = Edit(handle, finals, "alphaedit", meta).apply()
    if state is not None:   # only an applied edit enters the memory of earlier edits
        mem = state.setdefault(STATE_KEY, {})
        for l, kk in new_prior.items():
            mem[l] = prior_keys(state, l, d) + kk
        state["alphaedit_edits"] = int(state.get("alphaedit_edits", 0)) + len(kept)
    return e
