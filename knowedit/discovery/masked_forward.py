"""Running a model with some of its weights masked, without writing the model.

The masked weights go in through ``torch.func.functional_call``; the stored parameters are never
assigned, so the model stays bit-identical even when the forward pass raises.

Two ablations of the elements outside a mask:

* ``zero`` (Ge et al.): the element is 0. A zeroed norm gain zeroes that channel of the stream for
  every later reader, which is one reason norms end up in zero-ablation circuits.
* ``mean``: the element keeps its weight but reads the *mean input* instead of the actual one, so a
  linear map computes ``(W∘m)x + (W∘(1-m))x̄ + b`` and a norm ``(g∘m)∘x̂ + (g∘(1-m))∘x̂̄ + β``.
  ``x̄``/``x̂̄`` are token means over the real (non-pad, non-BOS) positions of the task's corrupted
  prompts. A bias, being a constant, is its own mean, so under ``mean`` biases are never ablated.
"""
from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call

from ..errors import KnoweditError
from ..circuit.maskable import owner_modules

ABLATIONS = ("zero", "mean")


def check_ablation(ablation: str) -> str:
    if ablation not in ABLATIONS:
        raise KnoweditError(f"mask ablation: {ablation!r} is unknown; use one of {', '.join(ABLATIONS)} "
                            "(zero = Ge et al.'s pruning)")
    return ablation


def _real_positions(handle, batch, bos: bool | None) -> torch.Tensor:
    keep = batch.attention_mask.bool().clone()
    if handle.uses_bos(bos):
        keep[:, 0] = False
    return keep


@torch.no_grad()
def input_means(handle, task, names: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``{param: mean}``: for a weight matrix, its module's mean input ``[in]``; for a norm gain, the
    mean normalized value ``x̂̄`` (recovered as (mean output − bias) / gain, 0 where the gain is 0)."""
    mods = owner_modules(handle, names)
    sums: dict[str, torch.Tensor] = {}
    count = [0]
    keep_ref: dict = {}
    hooks = []

    def make(pname, mod, is_norm):
        def hook(m, args, out):
            x = out if is_norm else args[0]
            k = keep_ref["k"]
            sums[pname] = sums.get(pname, 0) + x[k].double().sum(0)
        return hook

    params = dict(handle.model.named_parameters())
    for pname, (mod, pkind) in mods.items():
        if pkind != "weight" or params[pname].dim() not in (1, 2):
            continue
        is_norm = params[pname].dim() == 1
        hooks.append(mod.register_forward_hook(make(pname, mod, is_norm)))
    try:
        for i in range(0, len(task), batch_size):
            b = handle.tokenize(task.corrupt[i:i + batch_size], bos=task.bos)
            keep_ref["k"] = _real_positions(handle, b, task.bos)
            count[0] += int(keep_ref["k"].sum())
            handle.forward(b)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for pname, s in sums.items():
        mean = (s / count[0]).to(params[pname].dtype)
        if params[pname].dim() == 1:
            mod = mods[pname][0]
            g = params[pname].detach()
            beta = getattr(mod, "bias", None)
            num = mean - (beta.detach() if beta is not None else 0)
            mean = torch.where(g != 0, num / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(g))
        out[pname] = mean
    return out


@contextlib.contextmanager
def mean_correction(handle, means: dict[str, torch.Tensor]):
    """Hooks adding the mean-input term of the ablated part of each masked weight (see module doc).

    Inside ``functional_call`` a module's ``weight`` is the masked tensor, so the term
    ``x̄ (W − W∘m)`` is computed from the original and the current weight and carries gradients."""
    a = handle.adapter
    mods = owner_modules(handle, list(means))
    params = dict(handle.model.named_parameters())
    hooks = []

    def make(pname, mod):
        orig = params[pname].detach()
        mean = means[pname]
        if orig.dim() == 1:
            def hook(m, args, out):
                return out + (orig - m.weight) * mean
        else:
            base = mean @ (orig.t() if a.out_dim(mod) == 0 else orig)

            def hook(m, args, out):
                return out + (base - mean @ a.weight_in_out(m))
        return hook

    try:
        for pname in means:
            mod, _ = mods[pname]
            hooks.append(mod.register_forward_hook(make(pname, mod)))
        yield
    finally:
        for h in hooks:
            h.remove()


def masked_last_logits(handle, batch, weights: dict[str, torch.Tensor], means: dict | None = None) -> torch.Tensor:
    """Last-position logits ``[B, V]`` with ``weights`` (``{param: tensor}``) substituted."""
    model = handle.model
    frozen = {n: p.detach() for n, p in model.named_parameters()}
    frozen.update(weights)
    keep = torch.unique(batch.last)
    ctx = mean_correction(handle, means) if means else contextlib.nullcontext()
    with ctx:
        logits = functional_call(model, frozen, (), {"input_ids": batch.input_ids,
                                                     "attention_mask": batch.attention_mask,
                                                     "use_cache": False, "logits_to_keep": keep}).logits
    col = torch.searchsorted(keep, batch.last)
    return logits[torch.arange(len(batch), device=logits.device), col]
