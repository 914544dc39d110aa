"""The one mechanism behind patching and ablation: overwrite chosen components' activations.

Values broadcast against ``[B, T, d]``: a full ``[B, T, d]`` tensor (patching from another run),
``[T, d]`` (per-position means) or ``[d]`` (a constant, e.g. a token mean or zeros). A neuron's value
is ``[B, T]``, ``[T]`` or a scalar; all neurons of one MLP share one hook."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Mapping

import torch

from ..errors import KnoweditError
from ..models.components import Component
from .hookset import HookSet
from .neurons import grouped, neuron_writes, position_mask


def _fit(value: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    B, T = like.shape[:2]
    v = value.to(device=like.device, dtype=like.dtype)
    if v.dim() == 3 and v.shape[0] == B and v.shape[1] >= T:
        return v[:, :T]
    if v.dim() == 2 and v.shape[0] >= T:
        return v[:T].unsqueeze(0).expand(B, T, -1)
    if v.dim() == 1:
        return v.view(1, 1, -1).expand(B, T, -1)
    raise KnoweditError(
        f"value for {name}: shape {tuple(value.shape)} does not fit activations {tuple(like.shape)}; "
        "give [B, T, d] from a run on a batch of the same size, [T, d] or [d]"
    )


def _put(target: torch.Tensor, value: torch.Tensor, pmask: torch.Tensor | None) -> torch.Tensor:
    if pmask is None:
        return value
    return torch.where(pmask.unsqueeze(-1), value, target)


@contextlib.contextmanager
def replace_activations(handle, values: Mapping[str | Component, torch.Tensor], positions=None):
    """Overwrite activations of heads (before W_O), MLPs (outputs), neurons or ``emb`` while the block runs."""
    a = handle.adapter
    by_layer: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
    mlps: dict[int, torch.Tensor] = {}
    neurons: dict[Component, torch.Tensor] = {}
    emb = None
    for key, val in values.items():
        c = handle.component(key)
        if not isinstance(c, Component) or c.kind == "logits" or c.port:
            raise KnoweditError(f"component {key!r}: only heads, MLPs, neurons and 'emb' can be replaced")
        if c.kind == "head":
            by_layer[c.layer][c.head] = val
        elif c.kind == "neuron":
            neurons[c] = val
        elif c.kind == "mlp":
            mlps[c.layer] = val
        else:
            emb = val

    def head_hook(layer, heads):
        def fn(mod, args):
            x = args[0]
            B, T = x.shape[:2]
            z = x.view(B, T, a.n_heads, a.d_head).clone()
            pm = position_mask(positions, B, T, x.device)
            for h, v in heads.items():
                z[:, :, h] = _put(z[:, :, h], _fit(v, z[:, :, h], f"a{layer}.h{h}"), pm)
            return (z.view_as(x),) + tuple(args[1:])
        return fn

    def out_hook(name, v):
        def fn(mod, args, out):
            pm = position_mask(positions, out.shape[0], out.shape[1], out.device)
            return _put(out, _fit(v, out, name), pm)
        return fn

    with HookSet() as hs, neuron_writes(handle, grouped(neurons), positions=positions):
        for layer, heads in by_layer.items():
            hs.pre(a.o_proj(layer), head_hook(layer, heads))
        for layer, v in mlps.items():
            hs.post(a.mlp(layer), out_hook(f"m{layer}", v))
        if emb is not None:
            hs.post(a.embed, out_hook("emb", emb))
        yield
