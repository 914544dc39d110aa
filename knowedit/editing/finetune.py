"""FT-L and FT-M: fine-tune chosen weights until the model gives the new target.

FT-L is constrained fine-tuning (Zhu et al. 2020, the ROME paper's FT-L baseline): Adam on the
chosen weights, each clamped after every step to ``original ± norm_constraint`` (an L∞ ball).
FT-M (EasyEdit's ``objective_optimization: target_new``) trains the same weights with
teacher-forced cross-entropy on the target tokens, prompt masked. Both stop early, as EasyEdit
does, once the loss of every batch in a pass is below ``early_stop_loss``.

Which weights train:

- ``mask=None``: the MLP down projection (weight, and bias where the model has one) of each layer in
  ``hparams["layers"]``, or the parameters whose names contain ``rewrite_module_tmp.format(layer)``
  when that EasyEdit template is given.
- ``mask=`` a ParameterMask: exactly the masked elements, in every tensor the mask touches (head
  q/k/v/o slices, MLP neuron rows/columns, norms if included). ``layers`` is then ignored, so circuit,
  complement and random controls each train what they select. ``restrict_to_layers: true`` instead
  trains the mask ∩ the ``layers`` parameters.
- ``mode="ablate"``: the same trainable elements, inside the pruned network (see
  :mod:`knowedit.editing.masking`); the returned edit keeps the pruned weights at zero.

The model is never written while training: the loss runs through ``torch.func.functional_call``
with candidate tensors built by ``masked_scatter`` over the originals, so unmasked elements are
bit-identical and an exception anywhere leaves the model untouched. Only the final
:class:`~knowedit.editing.edit.Edit` writes, atomically.
"""
from __future__ import annotations

import time

import torch
from torch.func import functional_call

from ..errors import KnoweditError
from ..models.dtypes import at_least_float32
from ..models.weights import offloaded_names
from .edit import Edit
from .ft_objectives import batch_loss, forward_kwargs, make_batch
from .masking import check_mask_handle, check_mode, pruned_elements
from .preserve import PRESERVE_DEFAULTS, preserve_settings, weight_projectors

_COMMON = {
    # layers None: the layer at 30% depth (9 of 30), where the default model's facts edit well
    "layers": None, "num_steps": 25, "lr": 5e-4, "weight_decay": 0.0, "kl_factor": 0.0, "norm_constraint": None,
    "batch_size": 1, "max_length": 40, "rewrite_module_tmp": None, "early_stop_loss": 1e-2,
    "restrict_to_layers": False, **PRESERVE_DEFAULTS,
}
# FT-L is the constrained method: the reference's learning rate and L∞ bound (ROME's FT-L baseline)
FT_L_DEFAULTS = {**_COMMON, "objective_optimization": "prompt_last", "norm_constraint": 5e-4, "lr": 5e-4}
FT_M_DEFAULTS = {**_COMMON, "objective_optimization": "target_new", "lr": 2e-3}


def layer_params(handle, hparams: dict) -> list[str]:
    """Parameter names fine-tuned when no mask is given."""
    a = handle.adapter
    names = [n for n, _ in handle.model.named_parameters()]
    layers = hparams["layers"]
    if layers is None:
        layers = [round(0.3 * (a.n_layers - 1))]
    bad = [l for l in layers if not 0 <= int(l) < a.n_layers]
    if bad or not layers:
        raise KnoweditError(f"hparams 'layers': {layers} must be a non-empty list of layers in 0..{a.n_layers - 1}")
    tmp = hparams.get("rewrite_module_tmp")
    if tmp:
        out = [n for n in names for l in layers if tmp.format(l) in n]
        if not out:
            raise KnoweditError(f"hparams 'rewrite_module_tmp': {tmp!r} matches no parameter of this model "
                                f"(e.g. {names[len(names) // 2]!r}); drop the field to use the MLP down projection")
        return list(dict.fromkeys(out))
    return [a.name_of(p) for l in layers for p in a.mlp_out(l).parameters(recurse=False)]


def trainable_elements(handle, hparams: dict, mask) -> dict[str, torch.Tensor]:
    """``{param: bool tensor}`` of the elements that may change (see the module docstring)."""
    params = dict(handle.model.named_parameters())
    if mask is None:
        return {n: torch.ones_like(params[n], dtype=torch.bool) for n in layer_params(handle, hparams)}
    out = dict(mask.tensors)
    if hparams.get("restrict_to_layers"):
        keep = set(layer_params(handle, hparams))
        out = {n: m for n, m in out.items() if n in keep}
    out = {n: m for n, m in out.items() if m.any()}
    if not out:
        raise KnoweditError("mask: selects no trainable parameters" +
                            (" within hparams 'layers' (restrict_to_layers is on)" if hparams.get("restrict_to_layers")
                             else ""))
    return out


def _check(hparams: dict):
    for k in ("num_steps", "batch_size", "max_length"):
        if not isinstance(hparams[k], int) or hparams[k] < 1:
            raise KnoweditError(f"hparams {k!r}: {hparams[k]!r} must be a positive integer")
    if not hparams["lr"] > 0:
        raise KnoweditError(f"hparams 'lr': {hparams['lr']!r} must be positive")
    nc = hparams.get("norm_constraint")
    if nc is not None and nc is not False and not (isinstance(nc, (int, float)) and nc > 0):
        raise KnoweditError(f"hparams 'norm_constraint': {nc!r} must be a positive number, or null/false for none")
    if hparams.get("kl_factor"):
        raise KnoweditError("hparams 'kl_factor': FT has no KL term (EasyEdit's FT ignores it too); set it to 0")


def finetune(handle, requests, hparams: dict, mask=None, mode: str = "restrict", method: str = "ft") -> Edit:
    """Fine-tune for ``requests`` and return the (not yet applied) :class:`Edit`."""
    _check(hparams)
    check_mode(mode, mask)
    check_mask_handle(mask, handle)
    t0 = time.perf_counter()
    model = handle.model
    params = dict(model.named_parameters())
    offloaded = offloaded_names(model)
    if offloaded:
        raise KnoweditError(f"{method}: the model keeps {len(offloaded)} weights offloaded by accelerate (e.g. "
                            f"{offloaded[0]}); fine-tuning substitutes every weight in the forward pass and needs them "
                            "all on a device. Load it without 'cpu'/'disk' entries in device_map, or use ROME, MEMIT "
                            "or AlphaEdit, which edit offloaded weights")
    train = trainable_elements(handle, hparams, mask)
    zero = pruned_elements(mask) if mode == "ablate" else {}
    preserve = preserve_settings(hparams)
    projectors, frozen = weight_projectors(handle, train, preserve) if preserve else ({}, [])
    train = {n: m for n, m in train.items() if n not in frozen}
    if not train:
        raise KnoweditError(f"preserve: the only trainable tensors ({', '.join(frozen)}) are biases or norms, which "
                            "cannot be kept off the preserved tasks' inputs; train weight matrices or drop 'preserve'")
    removed = []

    bases = {}  # what each touched tensor is before training: the original, pruned in ablate mode
    for n in set(train) | set(zero):
        base = params[n].detach()
        bases[n] = base.masked_fill(zero[n], 0) if n in zero else base
    # The trained elements' master copy is float32 whatever the model's dtype: steps of lr ~5e-4 are at or
    # below bfloat16's spacing near typical weights and would be rounded away or coarsened. The forward and
    # the edit get them cast to the weight's dtype (for a float32 model neither cast copies anything).
    vals = {n: bases[n][m].to(at_least_float32(bases[n].dtype)).clone().requires_grad_(True) for n, m in train.items()}
    eps = hparams.get("norm_constraint")
    bounds = ({n: (vals[n].detach() - eps, vals[n].detach() + eps) for n in train}
              if eps is not None and eps is not False else None)
    opt = torch.optim.Adam(list(vals.values()), lr=hparams["lr"], weight_decay=hparams["weight_decay"])

    # Every parameter goes in detached, so autograd never reaches (or writes .grad on) the model's own.
    frozen = {n: p.detach() for n, p in params.items()}

    def current() -> dict[str, torch.Tensor]:
        out = {**frozen, **bases}
        for n, m in train.items():
            out[n] = bases[n].masked_scatter(m, vals[n].to(bases[n].dtype))
        return out

    bs = hparams["batch_size"]
    batches = [make_batch(handle, requests[i:i + bs], hparams["objective_optimization"], hparams["max_length"])
               for i in range(0, len(requests), bs)]
    stop, losses, steps = hparams["early_stop_loss"], [], 0
    with torch.enable_grad():
        for _ in range(hparams["num_steps"]):
            epoch = []
            for b in batches:
                opt.zero_grad(set_to_none=True)
                loss = batch_loss(functional_call(model, current(), (), forward_kwargs(b)).logits, b)
                epoch.append(float(loss.detach()))
                if epoch[-1] >= stop:
                    loss.backward()
                    opt.step()
                    steps += 1
                if bounds is not None:
                    with torch.no_grad():
                        for n, (lo, hi) in bounds.items():
                            vals[n].copy_(torch.maximum(torch.minimum(vals[n], hi), lo))
                if projectors:   # last, so the preserved inputs stay exact even where it leaves the L∞ ball
                    removed.append(_project(vals, bases, train, projectors))
            losses.append(sum(epoch) / len(epoch))
            if losses[-1] < stop:
                break
        with torch.no_grad():
            new_values = current()
        new_values = {n: new_values[n].detach() for n in bases}
        if mode == "restrict":  # tensors the optimiser left unchanged need not be written
            new_values = {n: v for n, v in new_values.items() if not torch.equal(v, params[n])}
    info = {"mode": mode, "objective_optimization": hparams["objective_optimization"],
            "trained_params": sorted(train), "trained_elements": int(sum(int(m.sum()) for m in train.values())),
            "pruned_elements": int(sum(int(m.sum()) for m in zero.values())), "optimizer_steps": steps,
            "loss_per_pass": losses, "seconds": time.perf_counter() - t0}
    if preserve:
        info["preserve"] = {"tasks": preserve["tasks"], "frozen": frozen,
                            "removed_mean": sum(removed) / len(removed) if removed else 0.0}
    return Edit(handle, new_values, method, info)


@torch.no_grad()
def _project(vals: dict, bases: dict, train: dict, projectors: dict) -> float:
    """Project each trained matrix's change off the preserved inputs, in place; returns the share of the
    change's norm removed."""
    before = after = 0.0
    for n, (P, axis) in projectors.items():
        m = train[n]
        D = torch.zeros(m.shape, dtype=torch.float64, device=m.device)
        D[m] = (vals[n] - bases[n][m]).double()
        before += float(D.norm()) ** 2
        Dp = D @ P.to(D.device) if axis == 1 else P.to(D.device) @ D
        after += float((D - Dp).norm()) ** 2
        vals[n].copy_((bases[n][m].double() + Dp[m]).to(vals[n].dtype))
    return (after / before) ** 0.5 if before > 0 else 0.0


def apply_ft_l(handle, requests, hparams: dict, mask=None, mode: str = "restrict") -> Edit:
    """FT-L edit, applied. ``hparams`` as in :data:`FT_L_DEFAULTS`."""
    hp = {**FT_L_DEFAULTS, **hparams}
    return finetune(handle, requests, hp, mask, mode, "ft-l").apply()


def apply_ft_m(handle, requests, hparams: dict, mask=None, mode: str = "restrict") -> Edit:
    """FT-M edit, applied. ``hparams`` as in :data:`FT_M_DEFAULTS`."""
    hp = {**FT_M_DEFAULTS, **hparams}
    return finetune(handle, requests, hp, mask, mode, "ft-m").apply()
