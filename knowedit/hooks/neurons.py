"""MLP neurons (``m{L}.n{i}``): the down projection's input coordinates, read and written with one
hook per MLP however many of its neurons are involved.

For a gated MLP (Llama) neuron i is act(gate_i)·up_i; for GPT-2 it is gelu(c_fc)_i. Both are what the
down projection (``c_proj`` / ``down_proj``) multiplies, so writing them here changes exactly what
the MLP adds to the residual stream through those neurons, nothing else."""
from __future__ import annotations

import contextlib
from typing import Mapping

import torch

from ..errors import KnoweditError
from ..models.components import Component
from .hookset import HookSet

HOWS = ("set", "add", "scale")


def fit_units(value, like: torch.Tensor, k: int, what: str, unit: str = "neurons") -> torch.Tensor:
    """Broadcast a value for ``k`` units (neurons, SAE latents) to ``like``'s ``[B, T, k]``: accepts
    ``[B, T, k]`` (a run on a batch of the same size, longer T allowed), ``[T, k]`` (per-position), ``[k]``
    or a scalar."""
    B, T = like.shape[:2]
    v = torch.as_tensor(value).to(device=like.device, dtype=like.dtype)
    if v.dim() == 0:
        return v.expand(B, T, k)
    if v.dim() == 3 and v.shape[0] == B and v.shape[1] >= T and v.shape[2] == k:
        return v[:, :T]
    if v.dim() == 2 and v.shape[0] >= T and v.shape[1] == k:
        return v[:T].unsqueeze(0).expand(B, T, k)
    if v.dim() == 1 and v.shape[0] == k:
        return v.view(1, 1, k).expand(B, T, k)
    raise KnoweditError(f"value for {what}: shape {tuple(v.shape)} does not fit {k} {unit} of activations "
                        f"[B={B}, T={T}]; give [B, T, k] (from a run on a batch of the same size), [T, k], [k] "
                        "or a scalar")


def position_mask(positions, B: int, T: int, device) -> torch.Tensor | None:
    """``positions``: None (all), an int, a list of ints (same for every prompt), or a LongTensor
    ``[B]`` (one position per prompt)."""
    if positions is None:
        return None
    m = torch.zeros(B, T, dtype=torch.bool, device=device)
    if isinstance(positions, torch.Tensor) and positions.dim() == 1 and positions.numel() == B:
        m[torch.arange(B, device=device), positions.to(device)] = True
    else:
        m[:, [positions] if isinstance(positions, int) else list(positions)] = True
    return m


@contextlib.contextmanager
def neuron_writes(handle, writes: Mapping[int, tuple], how: str = "set", positions=None):
    """``writes[layer] = (indices, value)``: while the block runs, those neurons of that layer are set
    to / shifted by / scaled by ``value`` (``how``), at ``positions`` (default every position).
    One pre-hook on each touched down projection."""
    if how not in HOWS:
        raise KnoweditError(f"how: {how!r} is unknown; use one of {HOWS}")
    a = handle.adapter

    def hook(layer, idx, value):
        def fn(mod, args):
            x = args[0]
            B, T = x.shape[:2]
            i = idx.to(x.device)
            cur = x.index_select(-1, i)
            v = fit_units(value, cur, len(i), f"layer {layer}'s neurons")
            new = v if how == "set" else cur + v if how == "add" else cur * v
            pm = position_mask(positions, B, T, x.device)
            if pm is not None:
                new = torch.where(pm.unsqueeze(-1), new, cur)
            x = x.clone()
            x[..., i] = new
            return (x,) + tuple(args[1:])
        return fn

    with HookSet() as hs:
        for layer, (idx, value) in sorted(writes.items()):
            idx = torch.as_tensor(idx, dtype=torch.long)
            if idx.numel() == 0:
                continue
            if int(idx.min()) < 0 or int(idx.max()) >= a.d_mlp:
                raise KnoweditError(f"neurons of m{layer}: indices must be in 0..{a.d_mlp - 1} (the MLP's width)")
            hs.pre(a.mlp_out(layer), hook(layer, idx, value))
        yield


def grouped(values: Mapping[Component, torch.Tensor]) -> dict[int, tuple[list[int], torch.Tensor]]:
    """``{layer: (indices, values [..., k])}`` from per-neuron values (``[B, T]``, ``[T]`` or scalars, broadcast
    together per MLP): the form :func:`neuron_writes` takes."""
    per_layer: dict[int, dict[int, torch.Tensor]] = {}
    for c, v in values.items():
        per_layer.setdefault(c.layer, {})[c.index] = torch.as_tensor(v)
    out = {}
    for layer, vals in per_layer.items():
        idx = sorted(vals)
        try:
            out[layer] = (idx, torch.stack(torch.broadcast_tensors(*[vals[i] for i in idx]), -1))
        except RuntimeError:
            raise KnoweditError(f"values for m{layer}'s neurons have shapes that do not broadcast together "
                                f"({sorted({tuple(v.shape) for v in vals.values()})}); give each [B, T], [T] or a "
                                "scalar") from None
    return out


@contextlib.contextmanager
def steer_neurons(handle, values: Mapping[str | Component, float | torch.Tensor], how: str = "add", positions=None):
    """Steer single neurons: ``{"m7.n123": 4.0}`` adds 4 to that neuron (``how='add'``), sets it
    (``'set'``) or multiplies it (``'scale'``) at ``positions`` (default: every position)."""
    comps = {}
    for name, v in values.items():
        c = handle.component(name)
        if not isinstance(c, Component) or c.kind != "neuron":
            raise KnoweditError(f"values: {name!r} is not a neuron; neuron steering takes names like 'm7.n123'")
        comps[c] = torch.as_tensor(v, dtype=torch.float32)
    with neuron_writes(handle, grouped(comps), how=how, positions=positions):
        yield


@contextlib.contextmanager
def keep_neurons(handle, keep: Mapping[int, torch.Tensor], reference: Mapping[int, torch.Tensor]):
    """Circuit evaluation at neuron level: in each layer of ``keep`` (a bool ``[d_mlp]``), the neurons
    marked False take their ``reference[layer]`` value (``[B, T, d_mlp]``, ``[T, d_mlp]`` or
    ``[d_mlp]``); those marked True keep their own. One ``torch.where`` per MLP."""
    a = handle.adapter

    def hook(layer, k, ref):
        def fn(mod, args):
            x = args[0]
            r = fit_units(ref, x, a.d_mlp, f"the reference of m{layer}'s neurons")
            return (torch.where(k.to(x.device), x, r),) + tuple(args[1:])
        return fn

    with HookSet() as hs:
        for layer, k in sorted(keep.items()):
            if bool(k.all()):
                continue   # nothing replaced in this MLP: no hook, no cost
            hs.pre(a.mlp_out(layer), hook(layer, k, reference[layer]))
        yield
